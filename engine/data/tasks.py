"""Verifiable downstream tasks: generated deterministically, with exact answers and a checker.

A task makes problems from integers; every problem has one exact answer (an integer), so accuracy
is measured without a judge model. Problems are split into ``train`` and ``test`` by a hash of the
problem itself, so the two splits never share a problem, whatever the sizes asked for.

Rows:

- train: ``{"prompt", "response", "answer", "task"}`` (``prompt`` + ``response`` are what
  ``refteacher finetune`` trains on; the response shows the working and ends with the answer);
- test: ``{"prompt", "answer", "task"}`` (what ``refteacher eval --task`` reads).

``check_answer(response, answer)`` takes the last integer in a model's response (thousands
separators allowed) and compares it exactly with the answer.
"""
from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from typing import Any, Callable

from refteacher.engine.errors import UserError

SPLITS = ("train", "test")
_TEST_SHARE = 8  # one problem in 8 (by hash) belongs to the test split


@dataclass(frozen=True)
class Problem:
    """One task instance: the question, a worked answer to train on, and the exact answer."""

    prompt: str
    response: str
    answer: str


def _addition(rng: random.Random) -> Problem:
    a, b = rng.randint(100, 999), rng.randint(100, 999)
    total = a + b
    return Problem(f"What is {a} + {b}?", f"{a} + {b} = {total}. The answer is {total}.", str(total))


def _multiplication(rng: random.Random) -> Problem:
    a, b = rng.randint(12, 99), rng.randint(12, 99)
    product = a * b
    tens, ones = divmod(b, 10)
    response = (f"{a} x {b} = {a} x {tens * 10} + {a} x {ones} = {a * tens * 10} + {a * ones} = {product}. "
                f"The answer is {product}.")
    return Problem(f"What is {a} x {b}?", response, str(product))


TASKS: dict[str, Callable[[random.Random], Problem]] = {
    "addition": _addition,  # 3-digit + 3-digit
    "multiplication": _multiplication,  # 2-digit x 2-digit, with a worked decomposition
}
DEFAULT_TASK = "addition"


def _split_of(problem: Problem) -> str:
    digest = hashlib.sha256(problem.prompt.encode()).digest()
    return "test" if digest[0] % _TEST_SHARE == 0 else "train"


def make_rows(task: str, split: str, n: int, *, seed: int = 0) -> list[dict[str, Any]]:
    """Return ``n`` distinct rows of ``task`` from ``split`` ("train" or "test"), deterministic in ``seed``.

    Train rows carry ``prompt``, ``response``, ``answer`` and ``task``; test rows ``prompt``,
    ``answer`` and ``task``. Raises UserError for an unknown task or split, or when the task has
    fewer than ``n`` distinct problems in the split.
    """
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}; choose one of {', '.join(sorted(TASKS))}")
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose train or test")
    if n < 0:
        raise UserError(f"n must be >= 0, got {n}")
    rng = random.Random(f"{task}|{seed}")
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    attempts = 0
    while len(rows) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise UserError(f"task {task!r} has too few distinct {split} problems for n={n}")
        problem = TASKS[task](rng)
        if problem.prompt in seen or _split_of(problem) != split:
            continue
        seen.add(problem.prompt)
        row: dict[str, Any] = {"prompt": problem.prompt}
        if split == "train":
            row["response"] = problem.response
        row.update(answer=problem.answer, task=task)
        rows.append(row)
    return rows


_INTEGER = re.compile(r"-?\d[\d,]*")


def extract_answer(response: str) -> str | None:
    """Return the last integer written in ``response`` (commas dropped), or None when there is none."""
    found = [m.group(0).replace(",", "") for m in _INTEGER.finditer(response)]
    found = [f for f in found if f.lstrip("-")]
    return found[-1].lstrip("+") if found else None


def check_answer(response: str, answer: str | int) -> bool:
    """Return True when the last integer in ``response`` equals ``answer`` exactly."""
    got = extract_answer(response)
    if got is None:
        return False
    try:
        return int(got) == int(str(answer).replace(",", ""))
    except ValueError:
        return False
