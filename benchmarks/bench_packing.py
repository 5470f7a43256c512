"""Benchmark the streaming packer: C++ vs its Python twin vs a naive plain-Python first-fit.

Lengths are lognormal (median 250 tokens, sigma 1.0, clipped to [1, max_len=4096]); window 1000.
Reports tokens/s, packing efficiency (real tokens / row capacity) and peak extra RSS for:
- ``cpp_chunks``: the compiled packer fed flat numpy chunks (``pack_token_chunks``), all N examples;
- ``cpp_per_example``: ``pack_sequences`` fed one numpy array per example (a subsample);
- ``python_reference``: ``pack_sequences_reference``, the same algorithm in plain Python (a subsample);
- ``naive_first_fit``: plain Python, every row kept open, first row that fits (a subsample; O(N * rows)).
Wall-clock and CPU-time (process_time) rates are both reported: on a shared machine the CPU-time
ones are the steadier comparison; the headline is cpp_chunks vs python_reference in tokens per CPU
second (the issue's target: at least 50x). Subsample figures are tokens/s over the subsample (throughput does not depend on N for the streaming
packers; the naive one gets slower as N grows). Memory flatness: the C++ run's peak RSS at N/10 and N.
trl's best-fit packing is compared when trl is installed, else skipped.

    python benchmarks/bench_packing.py [--quick] [--json PATH]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import environment, format_table, peak_memory, write_json  # noqa: E402

from refteacher.engine.data.packing import IGNORE_INDEX, pack_sequences, pack_token_chunks
from refteacher.engine.data.packing_reference import pack_sequences_reference

MAX_LEN = 4096
WINDOW = 1000
CHUNK = 1024


def lognormal_lengths(n: int, seed: int = 0) -> np.ndarray:
    """n lengths (int64), lognormal with median 250 and sigma 1.0, clipped to [1, MAX_LEN]."""
    rng = np.random.default_rng(seed)
    return np.clip(np.rint(rng.lognormal(np.log(250), 1.0, n)), 1, MAX_LEN).astype(np.int64)


def token_pool(lengths: np.ndarray, seed: int = 1) -> np.ndarray:
    """Random ids long enough for any chunk of CHUNK examples (chunks are views into it)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 49_152, CHUNK * MAX_LEN // 2 + MAX_LEN * 64, dtype=np.int64)


def chunks(lengths: np.ndarray, pool: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(flat_ids, offsets) chunks of CHUNK examples, token ids taken from a pool (no dataset in memory)."""
    for start in range(0, lengths.shape[0], CHUNK):
        part = lengths[start : start + CHUNK]
        offsets = np.zeros(part.shape[0] + 1, dtype=np.int64)
        np.cumsum(part, out=offsets[1:])
        reps = -(-int(offsets[-1]) // pool.shape[0])
        flat = pool[: offsets[-1]] if reps == 1 else np.tile(pool, reps)[: offsets[-1]]
        yield flat, offsets


def per_example(lengths: np.ndarray, pool: np.ndarray) -> Iterator[np.ndarray]:
    """One numpy array per example (views into the pool)."""
    for flat, offsets in chunks(lengths, pool):
        for i in range(offsets.shape[0] - 1):
            yield flat[offsets[i] : offsets[i + 1]]


def naive_first_fit(examples: Iterator[np.ndarray], max_len: int) -> list[dict[str, np.ndarray]]:
    """Plain-Python first fit: every row stays open; each example goes into the first row it fits."""
    rows: list[dict[str, Any]] = []
    for index, example in enumerate(examples):
        ids = example.tolist()
        for row in rows:
            if row["free"] >= len(ids):
                break
        else:
            row = {"free": max_len, "ids": [], "labels": [], "pos": [], "cu": [0], "ex": []}
            rows.append(row)
        row["free"] -= len(ids)
        row["ids"].extend(ids)
        row["labels"].extend([IGNORE_INDEX] + ids[1:])
        row["pos"].extend(range(len(ids)))
        row["cu"].append(row["cu"][-1] + len(ids))
        row["ex"].append(index)
    return [
        {
            "input_ids": np.array(r["ids"], dtype=np.int64),
            "labels": np.array(r["labels"], dtype=np.int64),
            "position_ids": np.array(r["pos"], dtype=np.int64),
            "cu_seqlens": np.array(r["cu"], dtype=np.int32),
            "example_index": np.array(r["ex"], dtype=np.int64),
        }
        for r in rows
    ]


def measure(name: str, run: Callable[[], tuple[int, int]], n_examples: int, with_memory: bool = True) -> dict[str, Any]:
    """Run ``run() -> (rows, real_tokens)`` once timed (and once more under the RSS sampler)."""
    start, cpu_start = time.perf_counter(), time.process_time()
    rows, tokens = run()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    peak = peak_memory(run) if with_memory else None
    print(f"  {name}: {n_examples} examples, {seconds:.2f} s", flush=True)
    return {
        "packer": name,
        "examples": n_examples,
        "tokens": tokens,
        "rows": rows,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "tokens_per_s": tokens / seconds,
        "tokens_per_cpu_s": tokens / cpu_seconds,
        "efficiency": tokens / (rows * MAX_LEN),
        "peak_rss_mb": None if peak is None else peak / 2**20,
    }


def count(rows_iter) -> tuple[int, int]:
    """Consume rows (dropping them, as a training loop would) and return (rows, real tokens)."""
    rows = tokens = 0
    for row in rows_iter:
        rows += 1
        tokens += int(row["input_ids"].shape[0]) if isinstance(row, dict) else row.num_tokens
    return rows, tokens


def trl_best_fit(lengths: np.ndarray, pool: np.ndarray) -> dict[str, Any] | str:
    """trl's best-fit-decreasing packing on the same examples, or why it was skipped."""
    try:
        from datasets import Dataset
        from trl.data_utils import pack_dataset
    except ImportError as exc:
        return f"skipped: trl not installed ({exc.name})"
    dataset = Dataset.from_dict({"input_ids": [e.tolist() for e in per_example(lengths, pool)]})

    def run() -> tuple[int, int]:
        packed = pack_dataset(dataset, MAX_LEN, strategy="bfd")
        return len(packed), int(sum(len(x) for x in packed["input_ids"]))

    return measure("trl_bfd", run, lengths.shape[0], with_memory=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small run (seconds) instead of 1M examples")
    parser.add_argument("--json", type=Path, help="write the figures to this JSON file")
    args = parser.parse_args(argv)

    n_full = 20_000 if args.quick else 1_000_000
    n_sub = {"cpp_per_example": 5_000, "python_reference": 5_000, "naive_first_fit": 2_000}
    if not args.quick:
        n_sub = {"cpp_per_example": 100_000, "python_reference": 100_000, "naive_first_fit": 20_000}
    lengths = lognormal_lengths(n_full)
    pool = token_pool(lengths)
    print(f"lengths: n={n_full} median={np.median(lengths):.0f} mean={lengths.mean():.0f} "
          f"max={lengths.max()} (max_len {MAX_LEN}, window {WINDOW}); load {os.getloadavg()[0]:.2f}", flush=True)

    results = []
    small = lengths[: n_full // 10]
    memory_small = measure("cpp_chunks", lambda: count(pack_token_chunks(chunks(small, pool), MAX_LEN, WINDOW)),
                           small.shape[0])
    results.append(measure("cpp_chunks", lambda: count(pack_token_chunks(chunks(lengths, pool), MAX_LEN, WINDOW)),
                           n_full))
    sub = lengths[: n_sub["cpp_per_example"]]
    results.append(measure("cpp_per_example", lambda: count(pack_sequences(per_example(sub, pool), MAX_LEN, WINDOW)),
                           sub.shape[0]))
    sub = lengths[: n_sub["python_reference"]]
    results.append(measure("python_reference",
                           lambda: count(pack_sequences_reference(per_example(sub, pool), MAX_LEN, WINDOW)),
                           sub.shape[0], with_memory=False))
    sub = lengths[: n_sub["naive_first_fit"]]
    results.append(measure("naive_first_fit", lambda: count(naive_first_fit(per_example(sub, pool), MAX_LEN)),
                           sub.shape[0], with_memory=False))
    trl = trl_best_fit(lengths[: n_sub["python_reference"]], pool)
    if isinstance(trl, dict):
        results.append(trl)
    else:
        print(f"  trl: {trl}")

    by_name = {r["packer"]: r for r in results}
    cpp = by_name["cpp_chunks"]["tokens_per_s"]
    cpp_cpu = by_name["cpp_chunks"]["tokens_per_cpu_s"]
    for r in results:
        r["speedup_of_cpp_chunks"] = cpp / r["tokens_per_s"]
        r["cpu_speedup_of_cpp_chunks"] = cpp_cpu / r["tokens_per_cpu_s"]
    memory = {
        "examples_small": memory_small["examples"],
        "peak_rss_mb_small": memory_small["peak_rss_mb"],
        "examples_full": by_name["cpp_chunks"]["examples"],
        "peak_rss_mb_full": by_name["cpp_chunks"]["peak_rss_mb"],
    }
    reference = by_name["python_reference"]
    ratios = {
        "cpp_chunks_vs_python_reference_cpu": cpp_cpu / reference["tokens_per_cpu_s"],
        "cpp_chunks_vs_python_reference_wall": cpp / reference["tokens_per_s"],
        "target": 50.0,
    }
    columns = ["packer", "examples", "tokens_per_s", "speedup_of_cpp_chunks", "tokens_per_cpu_s",
               "cpu_speedup_of_cpp_chunks", "efficiency", "peak_rss_mb", "seconds"]
    print(format_table(results, columns))
    print(f"C++ packer (chunks) vs its Python reference: {ratios['cpp_chunks_vs_python_reference_cpu']:.1f}x "
          f"tokens per CPU second, {ratios['cpp_chunks_vs_python_reference_wall']:.1f}x wall-clock (target >= 50x)")
    print(f"memory flatness (cpp_chunks peak extra RSS): {memory['examples_small']} examples "
          f"{memory['peak_rss_mb_small']:.1f} MB, {memory['examples_full']} examples {memory['peak_rss_mb_full']:.1f} MB")
    if args.json:
        payload = {
            "benchmark": "packing",
            "quick": args.quick,
            "config": {"max_len": MAX_LEN, "window": WINDOW, "length_median": 250, "length_sigma": 1.0,
                       "chunk_examples": CHUNK, "subsamples": n_sub, "load_average_1m": os.getloadavg()[0]},
            "environment": environment(),
            "results": results,
            "ratios": ratios,
            "memory_flatness": memory,
            "trl": trl if isinstance(trl, str) else "measured",
        }
        write_json(args.json, payload)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
