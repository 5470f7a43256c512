"""Benchmark: fused chunked linear-KL distillation loss against the naive twin, forward+backward.

For each device (CPU always, CUDA when present), shape (H, V) and token count N it times
``fused_linear_kl`` and ``fused_linear_kl_reference`` (full [N, V] logits, log_softmax, kl_div)
in the same run, each doing forward + backward (gradients for the student hidden states and, unless
``--frozen-head``, the student LM head), plus the four bare matmuls neither can avoid (student and
teacher logits, grad_hidden, grad_weight) as a floor. Peak memory is the extra memory one
forward+backward needs (``benchmarks.harness.peak_memory``: CUDA allocator peak, CPU RSS peak).

Shapes: N in {1024, 4096, 8192}; (H, V) in {(576, 49152) (the default model), (4096, 128256)
(Llama-3-8B)}. Cases whose naive run would not fit in free memory, or that take too long on a CPU
(the Llama head on CPU: ~17 TFLOP per step), are skipped and listed with the reason.

On CUDA, where Liger Kernel installs (``liger_kernel``), each case also times its fused linear JSD
(``LigerFusedLinearJSD``, a peer that likewise never holds [N, V] logits) against ours with
``direction="jsd"`` at beta 0.5 (the symmetric JSD, so both conventions of beta agree), and
records how far the two losses are apart.

    python benchmarks/bench_kl.py --quick --json benchmarks/results/kl_cpu.json
    python benchmarks/bench_kl.py --quick --device cuda --json benchmarks/results/kl_gpu.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import environment, format_table, peak_memory, time_call, write_json  # noqa: E402

from refteacher.kernels.kl import fused_linear_kl, fused_linear_kl_reference  # noqa: E402

TOKENS = (1024, 4096, 8192)
SHAPES = ((576, 49152), (4096, 128256))
QUICK_TOKENS = {"cpu": (1024, 4096), "cuda": (1024, 8192)}
# CPU: matmul FLOPs per step above which a case is skipped (2 cores do ~0.1 TFLOP/s).
CPU_MAX_FLOPS = 2e12
COLUMNS = [
    "device", "dtype", "N", "H", "V", "fused_ms", "naive_ms", "time_ratio", "matmul_ms",
    "fused_peak_mb", "naive_peak_mb", "memory_ratio",
]


def available_bytes(device: torch.device) -> int:
    """Free memory on ``device`` in bytes (CUDA: free device memory; CPU: MemAvailable)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def naive_bytes(n: int, hidden: int, vocab: int, dtype: torch.dtype, weight_grad: bool) -> int:
    """Rough peak of the naive twin: ~6 float32 [N, V] buffers, the heads, upcasts, grad_W."""
    logits = 6 * n * vocab * 4
    heads = 2 * vocab * hidden * (4 if dtype != torch.float32 else 0)  # float32 upcasts
    return logits + heads + (vocab * hidden * 4 if weight_grad else 0)


def make_case(n, hidden, vocab, dtype, device, weight_grad, seed=0):
    """Student/teacher hidden [N, H] and heads [V, H] with logits of std ~4."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dtype)

    inputs = {
        "student_hidden": rand(n, hidden).requires_grad_(True),
        "student_weight": rand(vocab, hidden, std=4 / hidden**0.5).requires_grad_(weight_grad),
        "teacher_hidden": rand(n, hidden),
        "teacher_weight": rand(vocab, hidden, std=4 / hidden**0.5),
    }
    return inputs


def step(fn, inputs, direction):
    """One forward+backward of ``fn``; clears the student gradients first."""
    for name in ("student_hidden", "student_weight"):
        inputs[name].grad = None

    def run():
        loss = fn(**inputs, direction=direction)
        loss.backward()
        for name in ("student_hidden", "student_weight"):
            inputs[name].grad = None

    return run


def bare_matmuls(inputs, weight_grad):
    """The matmuls any implementation needs, in the inputs' dtype (no softmax, no KL)."""
    sh, sw = inputs["student_hidden"].detach(), inputs["student_weight"].detach()
    th, tw = inputs["teacher_hidden"], inputs["teacher_weight"]

    def run():
        zs = sh @ sw.T
        zt = th @ tw.T
        del zt
        _ = zs @ sw
        if weight_grad:
            _ = zs.T @ sh

    return run


def liger_jsd():
    """Liger Kernel's fused linear JSD module class, or None when liger_kernel does not import."""
    try:
        from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD
    except Exception:  # not installed, or built for another torch/triton
        return None
    return LigerFusedLinearJSD


def add_liger_columns(row: dict, inputs: dict, device: torch.device, repeat: int, warmup: int) -> None:
    """Time Liger's fused linear JSD against ours (jsd, beta 0.5) on the same inputs; add to ``row``."""
    module = liger_jsd()
    if module is None or device.type != "cuda":
        row["liger"] = "not installed" if module is None else "CUDA only"
        return
    liger = module(jsd_beta=0.5, temperature=1.0)

    def ours_fn(**kw):
        return fused_linear_kl(**kw, beta=0.5)

    def liger_fn(student_hidden, student_weight, teacher_hidden, teacher_weight, direction):
        return liger(student_hidden, student_weight, teacher_hidden, teacher_weight)

    ours = step(ours_fn, inputs, "jsd")
    theirs = step(liger_fn, inputs, "jsd")
    row["jsd_fused_ms"] = time_call(ours, repeat=repeat, warmup=warmup, device=device)["median_ms"]
    row["liger_ms"] = time_call(theirs, repeat=repeat, warmup=warmup, device=device)["median_ms"]
    row["jsd_fused_peak_mb"] = peak_memory(ours, device) / 2**20
    row["liger_peak_mb"] = peak_memory(theirs, device) / 2**20
    row["liger_time_ratio"] = row["jsd_fused_ms"] / row["liger_ms"]
    with torch.no_grad():
        a = float(ours_fn(**{k: v.detach() for k, v in inputs.items()}, direction="jsd"))
        b = float(liger_fn(**{k: v.detach() for k, v in inputs.items()}, direction="jsd"))
    row["jsd_loss"], row["liger_loss"] = a, b
    row["liger_abs_diff"] = abs(a - b)


def run_case(device, dtype, n, hidden, vocab, args) -> dict:
    """Measure one case; returns a result row."""
    weight_grad = not args.frozen_head
    inputs = make_case(n, hidden, vocab, dtype, device, weight_grad)
    fused = step(fused_linear_kl, inputs, args.direction)
    naive = step(fused_linear_kl_reference, inputs, args.direction)
    repeat, warmup = (2, 1) if args.quick else (args.repeat, 1)
    row = {"device": device.type, "dtype": str(dtype).replace("torch.", ""), "N": n, "H": hidden,
           "V": vocab, "direction": args.direction, "weight_grad": weight_grad}
    fused_time = time_call(fused, repeat=repeat, warmup=warmup, device=device)
    naive_time = time_call(naive, repeat=repeat, warmup=warmup, device=device)
    matmul_time = time_call(bare_matmuls(inputs, weight_grad), repeat=repeat, warmup=warmup,
                            device=device)
    row["fused_peak_mb"] = peak_memory(fused, device) / 2**20
    row["naive_peak_mb"] = peak_memory(naive, device) / 2**20
    row["fused_ms"] = fused_time["median_ms"]
    row["naive_ms"] = naive_time["median_ms"]
    row["matmul_ms"] = matmul_time["median_ms"]
    row["time_ratio"] = row["fused_ms"] / row["naive_ms"]
    row["memory_ratio"] = row["fused_peak_mb"] / max(row["naive_peak_mb"], 1e-9)
    row["fused_over_matmul"] = row["fused_ms"] / row["matmul_ms"]
    row["timing"] = {"fused": fused_time, "naive": naive_time, "matmul": matmul_time}
    if device.type == "cuda":
        add_liger_columns(row, inputs, device, repeat, warmup)
    return row


def skip_reason(device, dtype, n, hidden, vocab, args) -> str | None:
    """Why a case cannot run here, or None."""
    flops = (8 if not args.frozen_head else 6) * n * hidden * vocab
    if device.type == "cpu" and flops > CPU_MAX_FLOPS:
        return f"CPU: {flops / 1e12:.1f} TFLOP per step is too slow for a CPU run"
    need = naive_bytes(n, hidden, vocab, dtype, not args.frozen_head)
    free = available_bytes(device)
    if need > 0.7 * free:
        return f"naive needs ~{need / 2**30:.1f} GiB, only {free / 2**30:.1f} GiB free"
    return None


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print a Markdown table, optionally write JSON; returns 0."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer token counts and repeats (CPU: N=1024, 4096; default head)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: CPU, and CUDA when present")
    parser.add_argument("--direction", choices=("forward", "reverse", "jsd"), default="forward")
    parser.add_argument("--frozen-head", action="store_true",
                        help="no gradient for the student LM head (the LoRA case)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="timed repeats per case (not --quick)")
    args = parser.parse_args(argv)

    devices = []
    if args.device in ("auto", "cpu"):
        devices.append(torch.device("cpu"))
    if args.device in ("auto", "cuda") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    cases, skipped = [], []
    for device in devices:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        tokens = QUICK_TOKENS[device.type] if args.quick else TOKENS
        for hidden, vocab in SHAPES:
            for n in tokens:
                reason = skip_reason(device, dtype, n, hidden, vocab, args)
                if reason:
                    skipped.append({"device": device.type, "N": n, "H": hidden, "V": vocab,
                                    "reason": reason})
                else:
                    cases.append((device, dtype, n, hidden, vocab))
    if args.device == "cuda" and not any(d.type == "cuda" for d in devices):
        parser.error("--device cuda: no CUDA device is visible to torch")
    rows = [run_case(*case, args) for case in tqdm(cases, desc="bench_kl", unit="case")]
    print(format_table(rows, COLUMNS))
    if any("liger_ms" in row for row in rows):
        print(format_table([r for r in rows if "liger_ms" in r],
                           ["N", "H", "V", "jsd_fused_ms", "liger_ms", "liger_time_ratio", "jsd_fused_peak_mb",
                            "liger_peak_mb", "liger_abs_diff"]))
    for skip in skipped:
        where = f"{skip['device']} N={skip['N']} H={skip['H']} V={skip['V']}"
        print(f"skipped {where}: {skip['reason']}")
    if args.json:
        payload = {
            "benchmark": "fused_linear_kl vs naive (forward+backward)",
            "command": " ".join(["python", "benchmarks/bench_kl.py", *(argv or sys.argv[1:])]),
            "environment": {d.type: environment(d) for d in devices},
            "liger_kernel": "installed" if liger_jsd() is not None else "not installed",
            "rows": rows,
            "skipped": skipped,
        }
        print(f"wrote {write_json(args.json, payload)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
