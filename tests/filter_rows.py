"""Input rows for the filter tests (tests/test_filter.py, tests/test_filter_ray.py): deterministic
prompts of varying length and JSONL files that mix plain, chat and malformed rows."""
from __future__ import annotations

import json
from pathlib import Path

WORDS = "how can I make a cake bomb garden code virus poem river build steal learn quickly please".split()


def make_prompt(i: int) -> str:
    """A deterministic prompt of 3..30 words, unique by its ``#i`` tail."""
    n = 3 + (i * 7) % 28
    return " ".join(WORDS[(i * 3 + k * 5) % len(WORDS)] for k in range(n)) + f" #{i}"


def write_rows(path: Path, n: int, *, bad_every: int = 0, blank_lines: bool = False) -> Path:
    """JSONL of ``n`` rows: plain prompts and every fifth a chat row (fields ``prompt``/``messages``
    and ``n``); with ``bad_every``, every ``bad_every``-th row is malformed instead (broken JSON or
    an empty prompt); with ``blank_lines``, a blank line follows rows 3, 20, 37, ... (no row, but it
    moves the line numbers that are the row ids)."""
    lines = []
    for i in range(n):
        if bad_every and i % bad_every == bad_every - 1:
            lines.append(b"{broken json" if i % 2 else b'{"prompt": ""}')
        elif i % 5 == 0:
            chat = [{"role": "user", "content": make_prompt(i)}, {"role": "assistant", "content": "sure"},
                    {"role": "user", "content": make_prompt(i + 1)}]
            lines.append(json.dumps({"messages": chat, "n": i}).encode())
        else:
            lines.append(json.dumps({"prompt": make_prompt(i), "n": i}).encode())
        if blank_lines and i % 17 == 3:
            lines.append(b"   ")
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path
