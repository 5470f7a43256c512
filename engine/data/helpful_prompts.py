"""Harmless prompts a model must keep answering: the helpful side of distillation and of evaluation.

The pool is the built-in ``everyday`` requests (arithmetic, code, writing, classification,
translation, trivia, general questions, advice) and ``topic_harmless`` (the topics harmful prompts
talk about, asked harmlessly). Both are in the default teacher's build sets, so the pool is cut
the way the teacher's data is (``split_records`` with the teacher's test seed):

- ``build``: the part the teacher is built on; distillation draws its helpful rows from it;
- ``choice``: half of the teacher's held-out part, for choosing settings (mix, lambda, temperature);
- ``report``: the other half, for the figures reported (never used to choose anything).

``exclude_kinds`` drops everyday kinds, so a run never counts the user's own task (the addition
quickstart drops ``arithmetic``) as everyday use.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Literal

from refteacher.engine.data.prompt_sets import PromptRecord, _project_rows, load_prompt_set, split_records
from refteacher.engine.errors import UserError

HELPFUL_SETS = ("everyday", "topic_harmless")
Part = Literal["build", "choice", "report"]
PARTS = ("build", "choice", "report")
_CHOICE_REPORT_SEED = 7919  # fixed: the choice/report halves do not move with the run's seed


@functools.lru_cache(maxsize=1)
def everyday_kinds() -> dict[str, str]:
    """Prompt -> kind (``arithmetic``, ``code`` ...) of every built-in everyday request."""
    return {row["prompt"].strip(): row["kind"] for row in _project_rows("everyday.jsonl")}


def task_kind(task: str) -> str:
    """The everyday kind a downstream task belongs to (the quickstart's tasks are all arithmetic)."""
    return "arithmetic" if task in ("addition", "multiplication") else task


def helpful_records(part: Part, *, test_fraction: float = 0.2, seed: int = 0,
                    exclude_kinds: Sequence[str] = ()) -> list[PromptRecord]:
    """The helpful pool's records in ``part`` (see the module doc), in set order.

    ``test_fraction`` and ``seed`` must be those of the teacher build's held-out split
    (``teacher.training.default_records``), so ``build`` is what the teacher saw and the other two
    parts are what it did not.
    """
    if part not in PARTS:
        raise UserError(f"unknown part {part!r}; choose one of {', '.join(PARTS)}")
    kinds = everyday_kinds()
    records = [r for name in HELPFUL_SETS for r in load_prompt_set(name)
               if kinds.get(r.prompt) not in set(exclude_kinds)]
    build, held_out = split_records(records, [1.0 - test_fraction, test_fraction], seed=seed + 1000)
    if part == "build":
        return build
    choice, report = split_records(held_out, [0.5, 0.5], seed=_CHOICE_REPORT_SEED)
    return choice if part == "choice" else report
