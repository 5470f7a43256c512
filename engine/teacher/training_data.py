"""The teacher's training data: prompts (with rephrasings and template-written harmless ones),
a calibration split, refusal targets and the model's own cached helpful answers.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from typing import Sequence

from refteacher.engine.data.prompt_sets import split_records
from refteacher.engine.errors import UserError
from refteacher.engine.modeling.generation import generate
from refteacher.engine.storage import cache_root, write_json_atomic
from refteacher.engine.teacher.harmless_templates import benign_prompts
from refteacher.engine.teacher.rephrasing import FORMS, rephrasings


@dataclass
class TeacherData:
    """Prompt lists for training the teacher and calibrating its threshold.

    ``train_*`` feed the feature loss (originals + rephrasings), ``ce_harmless`` are the prompts
    the model answers itself (helpfulness kept), ``calib_*`` pick the threshold (a split the
    training never saw, plus rephrasings of it written with another template seed), and give each
    hazard category its direction (``calib_harmful_categories``).
    """

    train_harmful: list[str]
    train_harmless: list[str]
    calib_harmful: list[str]
    calib_harmless: list[str]
    ce_harmless: list[str]
    counts: dict = field(default_factory=dict)
    calib_harmful_categories: list[str | None] = field(default_factory=list)  # one per calib_harmful prompt
    train_harmful_categories: list[str | None] = field(default_factory=list)  # one per train_harmful prompt


def _split(records, calib_fraction: float, seed: int):
    if calib_fraction <= 0:
        return list(records), []
    train, calib = split_records(list(records), [1.0 - calib_fraction, calib_fraction], seed=seed)
    return train, calib


def _with_rephrasings(prompts: Sequence[str], per_prompt: int, seed: int, forms: Sequence[str] = FORMS,
                      tags: Sequence | None = None) -> tuple[list[str], list]:
    """Return (the prompts then their rephrasings, the tag of each: a rephrasing takes its prompt's)."""
    tags = list(tags) if tags is not None else [None] * len(prompts)
    out, out_tags = list(prompts), list(tags)
    if per_prompt > 0:
        for prompt, tag in zip(prompts, tags):
            extra = [text for _, text in rephrasings(prompt, forms=forms, count=per_prompt, seed=seed)]
            out.extend(extra)
            out_tags.extend([tag] * len(extra))
    return out, out_tags


def build_teacher_data(
    harmful_records: Sequence,
    harmless_records: Sequence,
    *,
    calib_fraction: float = 0.25,
    rephrase_per_prompt: int = 2,
    template_harmless: int = 400,
    ce_harmless: int = 96,
    calib_rephrase: int = len(FORMS),
    calib_max_harmful: int | None = None,
    seed: int = 0,
) -> TeacherData:
    """Assemble the teacher's prompt lists from labelled PromptRecords.

    Each input set is split into train / calibration by content hash (pairs stay together).
    Training prompts get ``rephrase_per_prompt`` rephrasings each (same templates for both
    classes); ``template_harmless`` harmless prompts written from templates are added (a quarter
    of them go to calibration). Calibration prompts get one rephrasing each with a different
    template seed. Harmful calibration prompts get ``calib_rephrase`` rephrasings each (default:
    one in every form), so the recall rule holds across styles rather than only for the sets' own
    phrasing (the threshold then carries over to prompts worded unlike the training sets). When
    there are more than ``calib_max_harmful`` harmful calibration prompts, a seeded sample of that
    many is kept (in order). Raises UserError when a class is empty.
    """
    if not harmful_records or not harmless_records:
        raise UserError("the teacher needs both harmful and harmless prompts; check the prompt sets given")
    h_train, h_calib = _split(harmful_records, calib_fraction, seed)
    b_train, b_calib = _split(harmless_records, calib_fraction, seed)
    templates = benign_prompts(template_harmless, seed=seed) if template_harmless > 0 else []
    n_template_calib = int(round(len(templates) * calib_fraction)) if calib_fraction > 0 else 0
    t_calib, t_train = templates[:n_template_calib], templates[n_template_calib:]
    train_harmful, train_categories = _with_rephrasings([r.prompt for r in h_train], rephrase_per_prompt, seed,
                                                        tags=[getattr(r, "category", None) for r in h_train])
    train_harmless = _with_rephrasings([r.prompt for r in b_train], rephrase_per_prompt, seed)[0] + t_train
    calib_harmful, calib_categories = _with_rephrasings([r.prompt for r in h_calib], calib_rephrase, seed + 1,
                                                        tags=[getattr(r, "category", None) for r in h_calib])
    if calib_max_harmful is not None and len(calib_harmful) > calib_max_harmful:
        kept = sorted(random.Random(f"calib-harmful-{seed}").sample(range(len(calib_harmful)), calib_max_harmful))
        calib_harmful, calib_categories = [calib_harmful[i] for i in kept], [calib_categories[i] for i in kept]
    calib_harmless = _with_rephrasings([r.prompt for r in b_calib], 1, seed + 1)[0] + t_calib
    rng = random.Random(f"ce-harmless-{seed}")
    pool = [r.prompt for r in b_train] + t_train
    ce = rng.sample(pool, min(ce_harmless, len(pool)))
    counts = {
        "harmful_records": len(harmful_records), "harmless_records": len(harmless_records),
        "train_harmful": len(train_harmful), "train_harmless": len(train_harmless),
        "calib_harmful": len(calib_harmful), "calib_harmless": len(calib_harmless),
        "template_harmless": len(templates), "ce_harmless": len(ce),
    }
    return TeacherData(train_harmful, train_harmless, calib_harmful, calib_harmless, ce, counts, calib_categories,
                       train_categories)


def cached_answers(
    model, tokenizer, prompts: Sequence[str], *, model_hash: str, max_new_tokens: int, batch_size: int = 16,
    progress: bool = True,
) -> list[str]:
    """Return the model's greedy answers to ``prompts``, generated once and cached as JSON.

    The cache file under ``$REFTEACHER_CACHE/answers/`` is keyed by the model hash, the prompts and
    ``max_new_tokens``; a corrupt file is regenerated.
    """
    key = hashlib.sha256(json.dumps([model_hash, list(prompts), max_new_tokens]).encode()).hexdigest()[:20]
    path = cache_root() / "answers" / f"{model_hash}-{key}.json"
    if path.is_file():
        try:
            answers = json.loads(path.read_text())["answers"]
            if isinstance(answers, list) and len(answers) == len(prompts):
                return [str(a) for a in answers]
        except (OSError, ValueError, KeyError, TypeError):
            pass
    answers = generate(model, tokenizer, list(prompts), max_new_tokens=max_new_tokens, batch_size=batch_size,
                       progress=progress, desc="helpful answers")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"model_hash": model_hash, "max_new_tokens": max_new_tokens,
                             "prompts": list(prompts), "answers": answers}, indent=None)
    return answers
