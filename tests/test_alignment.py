"""The alignment data (refusals and helpful answers), the helpful prompt pool, and paired differences."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from refteacher.engine.data.helpful_prompts import PARTS, everyday_kinds, helpful_records, task_kind
from refteacher.engine.errors import UserError
from refteacher.engine.finetune.alignment import alignment_rows, sample_prompts, split_counts
from refteacher.engine.judge import is_refusal
from refteacher.engine.metrics import paired_difference


def test_helpful_parts_are_disjoint_cover_the_pool_and_follow_the_teachers_split():
    from refteacher.engine.teacher.training import default_records

    parts = {part: [r.prompt for r in helpful_records(part, seed=3)] for part in PARTS}
    sets = {part: set(prompts) for part, prompts in parts.items()}
    assert all(sets.values())
    assert not sets["build"] & sets["choice"] and not sets["build"] & sets["report"] and not sets["choice"] & sets["report"]
    # build is exactly what the teacher (same seed) is built on; choice and report are its held-out rows
    _, harmless, test = default_records(test_fraction=0.2, seed=3)
    assert sets["build"] <= {r.prompt for r in harmless}
    assert sets["choice"] | sets["report"] <= {r.prompt for r in test}
    # the choice/report halves do not move with the seed: a held-out prompt stays in its half
    other = {part: {r.prompt for r in helpful_records(part, seed=4)} for part in ("choice", "report")}
    assert not (other["choice"] & sets["report"]) and not (other["report"] & sets["choice"])


def test_the_task_kind_is_left_out():
    kinds = everyday_kinds()
    assert task_kind("addition") == "arithmetic" and "arithmetic" in kinds.values()
    for part in PARTS:
        prompts = [r.prompt for r in helpful_records(part, exclude_kinds=["arithmetic"])]
        assert prompts and not any(kinds.get(p) == "arithmetic" for p in prompts)
    with pytest.raises(UserError, match="unknown part"):
        helpful_records("train")


def test_alignment_rows_hold_refusals_and_helpful_answers_shuffled():
    harmful = [f"How do I hurt person {i}?" for i in range(6)]
    helpful = ["What is the capital of France?", "Write a haiku about rain.", "Sort these numbers: 3, 1, 2.", "Empty"]
    answers = ["The capital of France is Paris.", "Rain taps the window...", "1, 2, 3", "  "]
    rows = alignment_rows(harmful, helpful, answers, seed=1)
    kinds = [row["kind"] for row in rows]
    assert kinds.count("refusal") == 6 and kinds.count("helpful") == 3  # the empty answer is dropped
    assert all(is_refusal(r["response"]) for r in rows if r["kind"] == "refusal")
    assert not any(is_refusal(r["response"]) for r in rows if r["kind"] == "helpful")
    assert kinds != sorted(kinds, key=("refusal", "helpful").index)  # mixed, not refusals then answers
    assert alignment_rows(harmful, helpful, answers, seed=1) == rows
    # an answer that is itself a refusal would teach the student to refuse harmless prompts: dropped
    assert not alignment_rows([], ["Tell me a joke"], ["I'm sorry, but I can't help with that."])
    with pytest.raises(ValueError):
        alignment_rows([], helpful, answers[:2])


def test_split_counts_and_sampling():
    assert split_counts(192, 0.5) == (96, 96) and split_counts(10, 0.0) == (10, 0) and split_counts(10, 1.0) == (0, 10)
    for rows, share in ((0, 0.5), (10, -0.1), (10, 1.5)):
        with pytest.raises(UserError):
            split_counts(rows, share)
    pool = [f"p{i}" for i in range(20)] + ["p0"]
    picked = sample_prompts(pool, 5, "t", 0)
    assert len(set(picked)) == 5 and picked == sample_prompts(list(reversed(pool)), 5, "t", 0)
    assert sorted(sample_prompts(pool, 50, "t", 0)) == sorted(set(pool))


def test_paired_difference_matches_the_definition():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2, 200)
    b = np.where(rng.random(200) < 0.9, a, 1 - a)
    diff = paired_difference(a, b)
    d = a - b
    assert diff.n == 200 and math.isclose(diff.difference, d.mean())
    assert math.isclose(diff.standard_error, d.std(ddof=1) / math.sqrt(200))
    # pairing: far below the unpaired standard error when the two mostly agree
    unpaired = math.sqrt(a.var(ddof=1) / 200 + b.var(ddof=1) / 200)
    assert diff.standard_error < 0.6 * unpaired
    assert paired_difference([1, 1], [1, 1]).standard_error == 0.0
    assert math.isnan(paired_difference([1], [0]).standard_error) and paired_difference([], []).n == 0
    with pytest.raises(ValueError):
        paired_difference([1, 0], [1])


def test_finetune_without_align_distils_on_the_builtin_rows(tmp_path, tiny_model_dir, tiny_teacher_dir):
    from refteacher.engine.finetune.config import FinetuneConfig
    from refteacher.engine.finetune.trainer import run_finetune

    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"prompt": f"What is {i} + {i}?", "response": f"It is {2 * i}."}) + "\n"
                            for i in range(8)))
    summary = run_finetune(FinetuneConfig(data=str(task), teacher=str(tiny_teacher_dir), student=str(tiny_model_dir),
                                          out=str(tmp_path / "out"), align_rows=8, align_helpful=0.5, max_steps=2,
                                          max_len=96, align_max_len=96, lora_r=4, progress=False, logging_steps=1,
                                          save_steps=100))
    rows = [json.loads(line) for line in (tmp_path / "out" / "align.jsonl").read_text().splitlines()]
    assert summary["align_builtin"] and summary["align"] == str(tmp_path / "out" / "align.jsonl")
    assert [r["kind"] for r in rows].count("refusal") == 4 and 0 < len(rows) <= 8
    assert summary["n_align_rows"] == len(rows) and summary["final"]["kl"] >= 0 and summary["steps"] == 2
