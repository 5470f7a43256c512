"""Streaming readers: every row gives prompts or a rejection, ids are stable, formats agree."""
from __future__ import annotations

import json
import sys
import types

import pytest

from refteacher.engine.data.readers import (
    PromptFields,
    RowRejected,
    extract_prompts,
    iter_raw_rows,
    iter_rows,
    open_source,
)
from refteacher.engine.errors import UserError


def write_lines(path, lines: list[bytes]) -> str:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return str(path)


def test_jsonl_rows_get_line_number_ids_and_reasons(tmp_path):
    path = write_lines(tmp_path / "in.jsonl", [
        b'{"prompt": "hello there"}',
        b"",
        b'{"prompt": "   "}',
        b"not json",
        b'{"prompt": "caf\xff"}',
        b"[1, 2]",
        b'{"text": "no prompt field"}',
        b'{"prompt": 5}',
        b'{"prompt": "last one"}',
    ])
    rows = list(iter_rows(open_source(path)))
    assert [r.id for r in rows] == [1, 3, 4, 5, 6, 7, 8, 9]  # the blank line 2 is not a row
    assert [r.line for r in rows] == [r.id for r in rows]
    reasons = {r.id: r.reason for r in rows}
    assert reasons[1] is None and rows[0].prompts == ["hello there"]
    assert "empty prompt" in reasons[3]
    assert "not valid JSON" in reasons[4]
    assert "invalid UTF-8" in reasons[5]
    assert "JSON object" in reasons[6]
    assert "no 'prompt' field" in reasons[7]
    assert "must be a string" in reasons[8]
    assert reasons[9] is None and rows[-1].prompts == ["last one"]
    unreadable = {r.id: r for r in rows if r.record is None}
    assert set(unreadable) == {4, 5, 6} and unreadable[4].raw == "not json"
    assert all((r.reason is None) == bool(r.prompts) for r in rows)


def test_chat_rows_give_one_prompt_per_user_turn():
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [{"type": "text", "text": "second"}, {"type": "image_url", "image_url": {}}]},
    ]
    prompts = extract_prompts({"messages": messages})
    assert len(prompts) == 2
    assert prompts[0] == messages[:2]
    assert prompts[1][-1] == {"role": "user", "content": "second"} and len(prompts[1]) == 4


@pytest.mark.parametrize("messages, words", [
    ([], "non-empty list"),
    ([{"role": "assistant", "content": "hi"}], "no user message"),
    ([{"role": "user", "content": "  "}], "empty user message"),
    ([{"content": "no role"}], "needs a string 'role'"),
    ([{"role": "user", "content": 7}], "needs string 'content'"),
    ("not a list", "not a JSON message list"),
])
def test_malformed_chat_rows_are_rejected_with_the_reason(messages, words):
    with pytest.raises(RowRejected, match=words):
        extract_prompts({"messages": messages})


def test_prompt_field_option_and_messages_preferred():
    fields = PromptFields(prompt="instruction")
    assert extract_prompts({"instruction": "do it"}, fields) == ["do it"]
    both = {"prompt": "plain", "messages": [{"role": "user", "content": "chat"}]}
    assert extract_prompts(both) == [[{"role": "user", "content": "chat"}]]
    assert extract_prompts({"prompt": "plain", "messages": None}) == ["plain"]


def test_csv_records_with_quoted_newlines_and_bad_bytes(tmp_path):
    path = tmp_path / "in.csv"
    path.write_bytes(
        b'prompt,label\n'
        b'"first, with comma",a\n'
        b'"spans\ntwo lines",b\n'
        b'bad \xff byte,c\n'
        b'too,many,fields\n'
        b',empty\n'
        b'fine,d\n'
    )
    rows = list(iter_rows(open_source(str(path))))
    assert [r.id for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r.line for r in rows] == [2, 3, 5, 6, 7, 8]  # the line each record starts on
    assert rows[0].prompts == ["first, with comma"] and rows[0].record == {"prompt": "first, with comma", "label": "a"}
    assert rows[1].prompts == ["spans\ntwo lines"]
    assert "invalid UTF-8" in rows[2].reason
    assert "header has 2" in rows[3].reason
    assert "empty prompt" in rows[4].reason
    assert rows[5].prompts == ["fine"]


def test_tsv_and_gzip_jsonl(tmp_path):
    import gzip

    tsv = tmp_path / "in.tsv"
    tsv.write_text("prompt\tx\nhello, world\t1\n")
    assert [r.prompts for r in iter_rows(open_source(str(tsv)))] == [["hello, world"]]
    gz = tmp_path / "in.jsonl.gz"
    with gzip.open(gz, "wb") as f:
        f.write(b'{"prompt": "zipped"}\n')
    assert [r.prompts for r in iter_rows(open_source(str(gz)))] == [["zipped"]]


def test_parquet_streams_in_batches_with_row_number_ids(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from refteacher.engine.data import readers as data

    monkeypatch.setattr(data, "_PARQUET_BATCH_ROWS", 3)  # several record batches
    prompts = [f"prompt {i}" if i % 4 else "" for i in range(10)]
    table = pa.table({"prompt": prompts, "n": list(range(10))})
    path = tmp_path / "in.parquet"
    pq.write_table(table, path, row_group_size=4)
    source = open_source(str(path))
    assert source.num_rows() == 10
    rows = list(iter_rows(source))
    assert [r.id for r in rows] == list(range(1, 11))
    assert [r.record["n"] for r in rows] == list(range(10))
    assert [r.reason is not None for r in rows] == [p == "" for p in prompts]
    # skipping by ordinal keeps ids stable
    picked = [r.id for r in iter_raw_rows(source, wanted=lambda o: o % 3 == 1)]
    assert picked == [2, 5, 8]


def test_parquet_chat_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    messages = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                 {"role": "user", "content": "again"}]]
    path = tmp_path / "chat.parquet"
    pq.write_table(pa.table({"messages": messages}), path)
    (row,) = iter_rows(open_source(str(path)))
    assert len(row.prompts) == 2 and row.prompts[1][-1]["content"] == "again"


def test_wanted_skips_rows_but_keeps_ids(tmp_path):
    path = write_lines(tmp_path / "in.jsonl", [json.dumps({"prompt": f"p{i}"}).encode() for i in range(7)])
    raws = list(iter_raw_rows(open_source(path), wanted=lambda ordinal: ordinal >= 4))
    assert [(r.ordinal, r.id) for r in raws] == [(4, 5), (5, 6), (6, 7)]


def test_open_source_errors_say_how_to_fix(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        open_source(str(tmp_path / "missing.jsonl"))
    odd = tmp_path / "data.xyz"
    odd.write_text("x")
    with pytest.raises(UserError, match="--format"):
        open_source(str(odd))
    with pytest.raises(UserError, match="unknown input format"):
        open_source(str(odd), "yaml")
    assert open_source(str(odd), "jsonl").fmt == "jsonl"
    with pytest.raises(UserError, match="not a file"):
        open_source(str(tmp_path))
    array = tmp_path / "array.json"
    array.write_text('[{"prompt": "a"}]\n')
    with pytest.raises(UserError, match="JSON array"):
        list(iter_rows(open_source(str(array))))
    bad_parquet = tmp_path / "bad.parquet"
    bad_parquet.write_bytes(b"not parquet at all")
    with pytest.raises(UserError, match="not a readable Parquet"):
        list(iter_rows(open_source(str(bad_parquet))))


def test_hf_dataset_needs_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(UserError, match="pip install datasets"):
        list(iter_rows(open_source("hf:someone/some-set")))


def test_hf_dataset_streams_through_load_dataset(monkeypatch):
    calls = {}

    def load_dataset(name, config, split, streaming):
        calls.update(name=name, config=config, split=split, streaming=streaming)
        return iter([{"prompt": "a"}, {"prompt": ""}, {"messages": [{"role": "user", "content": "b"}]}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    source = open_source("hf:org/set", split="test", hf_config="cfg")
    rows = list(iter_rows(source))
    assert calls == {"name": "org/set", "config": "cfg", "split": "test", "streaming": True}
    assert [r.id for r in rows] == [1, 2, 3]
    assert rows[0].prompts == ["a"] and rows[1].reason and rows[2].prompts[0][0]["content"] == "b"
    assert source.fingerprint() == {"hf": "org/set", "config": "cfg", "split": "test"}
