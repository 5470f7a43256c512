"""Benchmark the packer's front doors against a numpy-backed Python best-fit-decreasing and trl.

Data: N examples (200k; 20k with --quick) with lognormal lengths (median 250 tokens, sigma 1.0,
clipped to [1, max_len=4096]), int32 token ids, window 1000. The same examples reach every packer
in the form it takes:

- ``per_example``: ``pack_sequences`` fed a list of one int32 numpy array per example;
- ``flat``: ``pack_token_chunks`` fed (flat ids, offsets) chunks of 1024 examples;
- ``arrow``: ``pack_arrow`` fed a ``list<int32>`` ChunkedArray (chunks of 1000 rows, as a Hugging
  Face dataset's table holds them), read in place;
- ``numpy_bfd``: the strongest simple Python alternative, written here: offline best-fit-decreasing
  (sort every example longest first, bisect into the fullest row that fits, build each row with
  ``np.concatenate``), fed the per-example list (``numpy_bfd``) or the flat ids + offsets, split into
  per-example views inside the timed call (``numpy_bfd_flat``);
- ``trl_bfd``: trl's ``pack_dataset(strategy="bfd")`` on a ``datasets.Dataset`` over the same Arrow
  table, when trl installs (``pip install -e ".[bench]"``), else skipped;
- ``python_reference`` (a 20k subsample): the packer's own algorithm in plain Python.

Every packer yields rows that a training loop drops as it goes (trl returns a whole packed
dataset). Each is timed ``--repeat`` times and the fastest run is kept; wall-clock and CPU-time
(``process_time``) rates are both reported, the CPU ones being steadier on a shared machine, and
the ratios are in tokens per CPU second. Peak extra RSS is measured in one more run of each after
all timings, with ``exact_cpu_rss`` on (harness.peak_memory), and for the Arrow path at N/10 and N
(flatness). Targets (issue 18):
per-example >= 3x numpy_bfd, flat and Arrow >= 5x numpy_bfd_flat, Arrow >= 5x trl_bfd.

    python benchmarks/bench_packing.py [--quick] [--repeat 3] [--json PATH]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from bisect import bisect_left, insort
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import environment, exact_cpu_rss, format_table, peak_memory, write_json  # noqa: E402

from refteacher.engine.data.packing import IGNORE_INDEX, pack_arrow, pack_sequences, pack_token_chunks
from refteacher.engine.data.packing_reference import pack_sequences_reference

MAX_LEN = 4096
WINDOW = 1000
CHUNK = 1024
ARROW_CHUNK_ROWS = 1000
VOCAB = 49_152
TARGETS = {"per_example": 3.0, "flat": 5.0, "arrow": 5.0, "arrow_vs_trl": 5.0}


def lognormal_lengths(n: int, seed: int = 0) -> np.ndarray:
    """n lengths (int64), lognormal with median 250 and sigma 1.0, clipped to [1, MAX_LEN]."""
    rng = np.random.default_rng(seed)
    return np.clip(np.rint(rng.lognormal(np.log(250), 1.0, n)), 1, MAX_LEN).astype(np.int64)


def make_data(lengths: np.ndarray, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(flat int32 ids [T], int64 offsets [N + 1]) for examples of the given lengths."""
    offsets = np.zeros(lengths.shape[0] + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.random.default_rng(seed).integers(0, VOCAB, int(offsets[-1]), dtype=np.int32)
    return flat, offsets


def per_example_list(flat: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
    """One numpy view per example."""
    bounds = offsets.tolist()
    return [flat[a:b] for a, b in zip(bounds, bounds[1:])]


def flat_chunks(flat: np.ndarray, offsets: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(flat_ids, offsets) chunks of CHUNK examples; views, offsets rebased to each chunk."""
    for start in range(0, offsets.shape[0] - 1, CHUNK):
        part = offsets[start : start + CHUNK + 1]
        yield flat[part[0] : part[-1]], part - part[0]


def arrow_column(flat: np.ndarray, offsets: np.ndarray) -> pa.ChunkedArray:
    """A list<int32> ChunkedArray over the same ids (no copy of the ids), ARROW_CHUNK_ROWS rows a chunk."""
    whole = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(flat))
    return pa.chunked_array([whole.slice(s, ARROW_CHUNK_ROWS) for s in range(0, len(whole), ARROW_CHUNK_ROWS)])


def numpy_best_fit_decreasing(examples: list[np.ndarray], max_len: int) -> Iterator[dict[str, np.ndarray]]:
    """Offline best-fit-decreasing in Python + numpy; yields one dict of row arrays per row.

    Every example (1-D integer array) goes, longest first, into the open row with the least free
    space that still holds it (the first row opened among equals), else a new row. Rows carry the
    packer's fields: int64 input_ids, labels (-100 on each example's first token), position_ids
    [n]; int32 cu_seqlens [k + 1]; int64 example_index [k].
    """
    lengths = np.fromiter(map(len, examples), dtype=np.int64, count=len(examples))
    order = np.argsort(-lengths, kind="stable")
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, row id) of open rows, sorted
    for i, n in zip(order.tolist(), lengths[order].tolist()):
        at = bisect_left(free, (n, -1))
        if at == len(free):
            room, row = max_len, len(rows)
            rows.append([])
        else:
            room, row = free.pop(at)
        rows[row].append(i)
        if room > n:
            insort(free, (room - n, row))
    for members in rows:
        sizes = lengths[members]
        cu = np.zeros(len(members) + 1, dtype=np.int32)
        np.cumsum(sizes, out=cu[1:])
        ids = np.concatenate([examples[i] for i in members]).astype(np.int64)
        labels = ids.copy()
        labels[cu[:-1]] = IGNORE_INDEX
        positions = np.arange(ids.shape[0]) - np.repeat(cu[:-1].astype(np.int64), sizes)
        yield {"input_ids": ids, "labels": labels, "position_ids": positions, "cu_seqlens": cu,
               "example_index": np.asarray(members, dtype=np.int64)}


def count(rows_iter) -> tuple[int, int]:
    """Consume rows (dropping them, as a training loop would) and return (rows, real tokens)."""
    rows = tokens = 0
    for row in rows_iter:
        rows += 1
        tokens += int(row["input_ids"].shape[0]) if isinstance(row, dict) else row.num_tokens
    return rows, tokens


def measure(name: str, run: Callable[[], tuple[int, int]], n_examples: int, repeat: int) -> dict[str, Any]:
    """Run ``run() -> (rows, real_tokens)`` ``repeat`` times and keep the fastest (peak memory: ``add_memory``)."""
    best = None
    for _ in range(repeat):
        start, cpu_start = time.perf_counter(), time.process_time()
        rows, tokens = run()
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        if best is None or cpu < best[1]:
            best = (wall, cpu)
    seconds, cpu_seconds = best
    print(f"  {name}: {n_examples} examples, {cpu_seconds:.3f} CPU-s ({seconds:.3f} s wall)", flush=True)
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
        "peak_rss_mb": None,
        "_run": run,
    }


def add_memory(results: list[dict[str, Any]], skip: tuple[str, ...] = ()) -> None:
    """Peak extra RSS of one more run of each packer, after every timing (``exact_cpu_rss``: freed
    memory is handed back, so a run cannot reuse unseen what an earlier one freed; Arrow then
    allocates through malloc too, not its own pool, which would keep freed memory likewise)."""
    exact_cpu_rss()
    pa.default_memory_pool().release_unused()  # else its pages go back to the OS during a measurement
    pa.set_memory_pool(pa.system_memory_pool())
    for r in results:
        run = r.pop("_run")
        if r["packer"] not in skip:
            r["peak_rss_mb"] = peak_memory(run) / 2**20


def trl_bfd(column: pa.ChunkedArray, repeat: int) -> dict[str, Any] | str:
    """trl's best-fit-decreasing ``pack_dataset`` on a datasets.Dataset over ``column``, or why skipped."""
    try:
        import trl
        from datasets import Dataset
        from datasets.table import InMemoryTable
        from trl.data_utils import pack_dataset
    except ImportError as exc:
        return f"skipped: trl not installed ({exc.name}); pip install -e '.[bench]'"
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    dataset = Dataset(InMemoryTable(pa.table({"input_ids": column})))

    def run() -> tuple[int, int]:
        packed = pack_dataset(dataset, MAX_LEN, strategy="bfd", map_kwargs={"keep_in_memory": True})
        lengths = packed.data.column("input_ids").combine_chunks()
        return len(packed), int(lengths.offsets[-1].as_py() - lengths.offsets[0].as_py())

    result = measure("trl_bfd", run, len(column), repeat)
    result["trl_version"] = trl.__version__
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="20k examples instead of 200k")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each packer (the fastest is kept)")
    parser.add_argument("--json", type=Path, help="write the figures to this JSON file")
    args = parser.parse_args(argv)

    n = 20_000 if args.quick else 200_000
    n_reference = 2_000 if args.quick else 20_000
    lengths = lognormal_lengths(n)
    flat, offsets = make_data(lengths)
    examples = per_example_list(flat, offsets)
    column = arrow_column(flat, offsets)
    print(f"lengths: n={n} median={np.median(lengths):.0f} mean={lengths.mean():.0f} max={lengths.max()} "
          f"(max_len {MAX_LEN}, window {WINDOW}); {flat.shape[0]} tokens; load {os.getloadavg()[0]:.2f}", flush=True)

    results = [
        measure("per_example", lambda: count(pack_sequences(examples, MAX_LEN, WINDOW)), n, args.repeat),
        measure("flat", lambda: count(pack_token_chunks(flat_chunks(flat, offsets), MAX_LEN, WINDOW)), n, args.repeat),
        measure("arrow", lambda: count(pack_arrow(column, MAX_LEN, window=WINDOW)), n, args.repeat),
        measure("numpy_bfd", lambda: count(numpy_best_fit_decreasing(examples, MAX_LEN)), n, args.repeat),
        measure("numpy_bfd_flat",
                lambda: count(numpy_best_fit_decreasing(np.split(flat, offsets[1:-1]), MAX_LEN)), n, args.repeat),
    ]
    trl = trl_bfd(column, args.repeat)
    if isinstance(trl, dict):
        results.append(trl)
    else:
        print(f"  trl: {trl}")
    reference = examples[:n_reference]
    results.append(measure("python_reference", lambda: count(pack_sequences_reference(reference, MAX_LEN, WINDOW)),
                           n_reference, 1))
    add_memory(results, skip=("python_reference",))
    small = column.slice(0, n // 10)
    memory_small = peak_memory(lambda: count(pack_arrow(small, MAX_LEN, window=WINDOW))) / 2**20

    by_name = {r["packer"]: r for r in results}
    for r in results:
        r["cpu_speedup_vs_numpy_bfd"] = r["tokens_per_cpu_s"] / by_name["numpy_bfd"]["tokens_per_cpu_s"]
    assert by_name["per_example"]["rows"] == by_name["flat"]["rows"] == by_name["arrow"]["rows"], "same rows expected"

    def ratio(ours: str, theirs: str) -> dict[str, float]:
        a, b = by_name[ours], by_name[theirs]
        return {"cpu": a["tokens_per_cpu_s"] / b["tokens_per_cpu_s"], "wall": a["tokens_per_s"] / b["tokens_per_s"]}

    ratios = {
        "per_example_vs_numpy_bfd": ratio("per_example", "numpy_bfd") | {"target": TARGETS["per_example"]},
        "flat_vs_numpy_bfd_flat": ratio("flat", "numpy_bfd_flat") | {"target": TARGETS["flat"]},
        "arrow_vs_numpy_bfd_flat": ratio("arrow", "numpy_bfd_flat") | {"target": TARGETS["arrow"]},
        "flat_vs_python_reference": ratio("flat", "python_reference"),
    }
    if "trl_bfd" in by_name:
        ratios["arrow_vs_trl_bfd"] = ratio("arrow", "trl_bfd") | {"target": TARGETS["arrow_vs_trl"]}
    for r in ratios.values():
        if "target" in r:
            r["met"] = r["cpu"] >= r["target"]
    memory = {"examples_small": n // 10, "peak_rss_mb_small": memory_small,
              "examples_full": n, "peak_rss_mb_full": by_name["arrow"]["peak_rss_mb"]}

    columns = ["packer", "examples", "tokens_per_cpu_s", "cpu_speedup_vs_numpy_bfd", "tokens_per_s", "efficiency",
               "peak_rss_mb", "cpu_seconds", "seconds"]
    print(format_table(results, columns))
    for name, r in ratios.items():
        target = f" (target >= {r['target']:g}x: {'met' if r['met'] else 'MISSED'})" if "target" in r else ""
        print(f"{name}: {r['cpu']:.2f}x tokens per CPU second, {r['wall']:.2f}x wall-clock{target}")
    print(f"memory flatness (arrow peak extra RSS): {memory['examples_small']} examples "
          f"{memory['peak_rss_mb_small']:.1f} MB, {memory['examples_full']} examples "
          f"{memory['peak_rss_mb_full']:.1f} MB")
    if args.json:
        payload = {
            "benchmark": "packing",
            "quick": args.quick,
            "config": {"max_len": MAX_LEN, "window": WINDOW, "length_median": 250, "length_sigma": 1.0,
                       "token_dtype": "int32", "flat_chunk_examples": CHUNK, "arrow_chunk_rows": ARROW_CHUNK_ROWS,
                       "repeat": args.repeat, "python_reference_examples": n_reference,
                       "load_average_1m": os.getloadavg()[0]},
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
