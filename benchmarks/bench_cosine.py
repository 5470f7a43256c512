"""Benchmark refusal scoring: refteacher.kernels.cosine against the naive twin, same run.

Naive = gather the last-prompt-token rows, upcast to float32, ``F.cosine_similarity``
(``refusal_scores_reference``). Fused = ``refusal_scores`` with the default backend for the
device (the chunked torch path on CPU, Triton on CUDA). For each case it reports the median
time, peak extra memory (see benchmarks/harness.py), their ratios, and on CUDA the achieved
read bandwidth (bytes of the selected rows / time) as a percentage of the GPU's peak where known.

    python benchmarks/bench_cosine.py --quick --json benchmarks/results/cosine_cpu.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (  # noqa: E402
    environment,
    exact_cpu_rss,
    format_table,
    peak_memory,
    time_call,
    write_json,
)

from refteacher.kernels.cosine import refusal_scores, refusal_scores_reference  # noqa: E402

# Published peak DRAM bandwidth, GB/s (vendor data sheets), matched on the device name.
PEAK_BANDWIDTH_GBS = {
    "H200": 4800.0,
    "H100 NVL": 3900.0,
    "H100 PCIe": 2000.0,
    "H100": 3350.0,  # SXM5
    "A100-SXM4-80GB": 2039.0,
    "A100 80GB PCIe": 1935.0,
    "A100": 1555.0,  # 40 GB
    "L40S": 864.0,
    "L4": 300.0,
    "A10": 600.0,
    "RTX 4090": 1008.0,
}

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def peak_bandwidth_gbs(device_name: str) -> float | None:
    """Return the published peak memory bandwidth (GB/s) for a GPU name, or None if unknown."""
    for key, value in PEAK_BANDWIDTH_GBS.items():  # ordered: specific names first
        if key in device_name:
            return value
    return None


def cases_for(device: str, quick: bool) -> list[dict]:
    """The shapes to run on ``device``: rows [N, H] and gathered [B, T, H] with positions."""
    if device == "cuda":
        cases = [
            dict(name="rows", n=65536, t=None, h=4096, k=1, dtype="bf16", backward=False),
            dict(name="rows-k3", n=65536, t=None, h=4096, k=3, dtype="bf16", backward=False),
            dict(name="gather", n=256, t=1024, h=4096, k=1, dtype="bf16", backward=False),
            dict(name="gather-fwd+bwd", n=256, t=1024, h=4096, k=1, dtype="bf16", backward=True),
        ]
        if quick:
            cases = cases[:1] + cases[2:3]
        return cases
    if quick:
        return [
            dict(name="rows", n=2048, t=None, h=2048, k=1, dtype="bf16", backward=False),
            dict(name="gather", n=64, t=256, h=576, k=1, dtype="bf16", backward=False),
            dict(name="gather-fwd+bwd", n=64, t=256, h=576, k=1, dtype="fp32", backward=True),
        ]
    return [
        dict(name="rows", n=8192, t=None, h=4096, k=1, dtype="bf16", backward=False),
        dict(name="rows-k3", n=8192, t=None, h=4096, k=3, dtype="bf16", backward=False),
        dict(name="rows-fp32", n=8192, t=None, h=4096, k=1, dtype="fp32", backward=False),
        dict(name="gather", n=256, t=512, h=576, k=1, dtype="bf16", backward=False),
        dict(name="gather-fwd+bwd", n=256, t=512, h=576, k=1, dtype="fp32", backward=True),
    ]


def make_inputs(case: dict, device: str):
    """Random hidden ([N, H] or [B, T, H]), feature ([H] or [K, H]) and positions for a case."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    dtype = DTYPES[case["dtype"]]
    shape = (case["n"], case["h"]) if case["t"] is None else (case["n"], case["t"], case["h"])
    hidden = torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
    fshape = (case["h"],) if case["k"] == 1 else (case["k"], case["h"])
    feature = torch.randn(fshape, generator=gen).to(device)
    positions = None
    if case["t"] is not None:
        positions = torch.randint(0, case["t"], (case["n"],), generator=gen).to(device)
    if case["backward"]:
        hidden.requires_grad_(True)
    return hidden, feature, positions


def make_call(fn, hidden, feature, positions, backward: bool):
    """A zero-argument callable running ``fn`` (and its backward when asked)."""

    def call():
        if backward:  # the [B, T, H] gradient is allocated and freed inside the call
            fn(hidden, feature, positions).sum().backward()
            hidden.grad = None
            return None
        with torch.no_grad():
            return fn(hidden, feature, positions)

    return call


def time_case(case: dict, device: str, repeat: int, warmup: int) -> dict:
    """Time both sides of one case and check they agree; return one result row."""
    hidden, feature, positions = make_inputs(case, device)
    row = dict(case)
    row["device"] = device
    row["fused_backend"] = "triton" if device == "cuda" else "torch"
    for label, fn in (("naive", refusal_scores_reference), ("fused", refusal_scores)):
        call = make_call(fn, hidden, feature, positions, case["backward"])
        row[f"{label}_ms"] = time_call(call, repeat=repeat, warmup=warmup, device=device)["median_ms"]
    with torch.no_grad():
        ref = refusal_scores_reference(hidden, feature, positions)
        got = refusal_scores(hidden, feature, positions)
    row["max_abs_diff"] = (ref - got).abs().max().item()
    row["speedup"] = row["naive_ms"] / row["fused_ms"]
    read_bytes = case["n"] * case["h"] * hidden.element_size()
    row["fused_gbs"] = read_bytes / (row["fused_ms"] * 1e-3) / 1e9
    if device == "cuda" and not case["backward"]:
        peak = peak_bandwidth_gbs(torch.cuda.get_device_name())
        row["fused_pct_peak_bw"] = None if peak is None else 100.0 * row["fused_gbs"] / peak
    return row


def measure_memory(row: dict) -> None:
    """Add the peak extra memory of both sides (MiB) and their ratio to a timed row."""
    device = row["device"]
    hidden, feature, positions = make_inputs(row, device)
    for label, fn in (("naive", refusal_scores_reference), ("fused", refusal_scores)):
        call = make_call(fn, hidden, feature, positions, row["backward"])
        call()  # warm: first-call allocations (autograd, kernels) are not the operation's
        row[f"{label}_peak_mib"] = peak_memory(call, device) / 2**20
    row["memory_ratio"] = row["fused_peak_mib"] / max(row["naive_peak_mib"], 1e-9)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH")
    parser.add_argument("--device", choices=["all", "cpu", "cuda"], default="all",
                        help="which devices to run (default: CPU, plus CUDA when present)")
    args = parser.parse_args(argv)

    devices = ["cpu"] if args.device in ("all", "cpu") else []
    if args.device in ("all", "cuda") and torch.cuda.is_available():
        devices.append("cuda")
    if args.device == "cuda" and not devices:
        parser.error("--device cuda: no CUDA device is visible to torch")
    repeat, warmup = (3, 1) if args.quick else (7, 2)
    rows, envs = [], {}
    for device in devices:
        envs[device] = environment(device)
        for case in cases_for(device, args.quick):
            rows.append(time_case(case, device, repeat, warmup))
    exact_cpu_rss()  # after every timing (it slows allocation down)
    for row in rows:
        measure_memory(row)
    columns = ["device", "name", "n", "t", "h", "k", "dtype", "naive_ms", "fused_ms", "speedup",
               "naive_peak_mib", "fused_peak_mib", "memory_ratio", "fused_gbs",
               "fused_pct_peak_bw", "max_abs_diff"]
    print(format_table(rows, columns))
    if args.json:
        path = write_json(args.json, {"benchmark": "cosine", "quick": args.quick,
                                      "environment": envs, "results": rows})
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
