"""`make gpu-check`: every CUDA test and the GPU case of every benchmark, in one go, on one GPU.

Runs, each with a time limit, in this order (about 5 minutes on one H100-class GPU; 8 at most):

1. ``pytest -m gpu``: the tests marked ``gpu`` (compiled Triton kernels against their twins, the
   filter and a finetune on CUDA); a marked test that skips here counts as a failure.
2. ``bench_kl.py --quick --device cuda``: fused linear KL against the naive twin and the bare
   matmuls, up to N=8192 with the Llama-3 head (V=128256), and Liger Kernel's fused JSD when
   ``liger_kernel`` imports.
3. ``bench_cosine.py --device cuda``: refusal scoring, with the share of peak memory bandwidth.
4. ``bench_filter.py --device cuda``: the filter end to end on the default model.
5. ``bench_finetune.py --quick --device cuda``: one finetune step with its memory accounted for.

Each benchmark writes ``benchmarks/results/<name>_gpu.json`` (with the device name from
``torch.cuda.get_device_name``); this script writes ``benchmarks/results/gpu_check_gpu.json``:
device, versions, each step's status and seconds, and the test counts. Exits 1 when a step
fails, 2 (with a message saying what to do) when torch sees no CUDA device.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TOTAL_BUDGET_S = 8 * 60


def steps(python: str) -> list[tuple[str, list[str], int]]:
    """(name, command, time limit in seconds) of every step, in order."""
    bench = ROOT / "benchmarks"
    return [
        ("tests", [python, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "-q", "-rs"], 120),
        ("kl", [python, str(bench / "bench_kl.py"), "--quick", "--device", "cuda",
                "--json", str(RESULTS / "kl_gpu.json")], 90),
        ("cosine", [python, str(bench / "bench_cosine.py"), "--device", "cuda",
                    "--json", str(RESULTS / "cosine_gpu.json")], 45),
        ("filter", [python, str(bench / "bench_filter.py"), "--device", "cuda",
                    "--json", str(RESULTS / "filter_gpu.json")], 110),
        ("finetune", [python, str(bench / "bench_finetune.py"), "--quick", "--device", "cuda",
                      "--json", str(RESULTS / "finetune_gpu.json")], 110),
    ]


def test_counts(junit: Path) -> dict[str, int]:
    """Counts of a pytest JUnit XML report: tests, failures, errors, skipped."""
    if not junit.is_file():
        return {}
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    return {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}


def run_step(name: str, command: list[str], limit: int, junit: Path) -> dict:
    """Run one step with its time limit; return its record (the output's tail on failure)."""
    if name == "tests":
        command = command + [f"--junitxml={junit}"]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=limit)
        code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as err:
        code = "timeout"
        output = (err.stdout or b"").decode(errors="replace") + (err.stderr or b"").decode(errors="replace")
    shown = ["python"] + [c.replace(f"{ROOT}/", "") for c in command[1:]]
    record = {"step": name, "command": " ".join(shown),
              "seconds": round(time.perf_counter() - started, 1), "status": "ok" if code == 0 else f"failed ({code})"}
    if name == "tests":
        record["tests"] = test_counts(junit)
        if record["tests"].get("skipped"):  # a GPU test that skips on a GPU machine is a failure here
            record["status"] = f"failed ({record['tests']['skipped']} gpu tests skipped)"
    if record["status"] != "ok":
        record["output_tail"] = output[-4000:]
    print(f"[gpu-check] {name}: {record['status']} in {record['seconds']} s", flush=True)
    if record["status"] != "ok":
        print(record["output_tail"], file=sys.stderr)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=[name for name, _, _ in steps(sys.executable)],
                        help="run only these steps")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"gpu-check needs a CUDA device, and torch {torch.__version__} (CUDA build: {torch.version.cuda}) "
              "sees none. Run it on a GPU machine with a CUDA build of torch: `make install` there picks one "
              "when nvidia-smi is present (remove a CPU-only .venv first).", file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name(0)
    print(f"[gpu-check] on {device}; results go to {RESULTS}", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    records = []
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        for name, command, limit in steps(sys.executable):
            if args.only and name not in args.only:
                continue
            records.append(run_step(name, command, limit, Path(tmp) / "junit.xml"))
    seconds = round(time.perf_counter() - started, 1)
    ok = all(r["status"] == "ok" for r in records)
    summary = {"check": "gpu-check", "device": device, "gpus": torch.cuda.device_count(), "torch": torch.__version__,
               "cuda": torch.version.cuda, "seconds": seconds, "within_budget": seconds <= TOTAL_BUDGET_S,
               "passed": ok, "steps": records,
               "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (RESULTS / "gpu_check_gpu.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"[gpu-check] {'passed' if ok else 'FAILED'} in {seconds} s on {device}; "
          f"summary in {RESULTS / 'gpu_check_gpu.json'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
