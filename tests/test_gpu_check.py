"""`make gpu-check` (benchmarks/gpu_check.py) on a machine without CUDA: it refuses loudly, and its
pieces (the step list, the JUnit counts, a step's record) work; the GPU run itself needs a GPU."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_check  # noqa: E402


def test_without_cuda_it_fails_loudly(monkeypatch, capsys):
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 2
    assert "gpu-check needs a CUDA device" in capsys.readouterr().err


def test_every_benchmark_writes_a_gpu_json():
    names = [name for name, _, _ in gpu_check.steps("python")]
    assert names == ["tests", "kl", "cosine", "filter", "finetune"]
    for name, command, limit in gpu_check.steps("python"):
        if name != "tests":
            assert "--device" in command and command[command.index("--device") + 1] == "cuda"
            assert command[command.index("--json") + 1].endswith(f"{name}_gpu.json")
    assert sum(limit for _, _, limit in gpu_check.steps("python")) <= gpu_check.TOTAL_BUDGET_S


def test_a_step_record_carries_counts_and_the_failure_tail(tmp_path):
    junit = tmp_path / "junit.xml"
    junit.write_text('<testsuites><testsuite tests="3" failures="0" errors="0" skipped="1"/></testsuites>')
    record = gpu_check.run_step("tests", [sys.executable, "-c", "print('ran')"], 30, junit)
    assert record["tests"] == {"tests": 3, "failures": 0, "errors": 0, "skipped": 1}
    assert record["status"].startswith("failed") and "ran" in record["output_tail"]  # a skipped GPU test fails
    failing = gpu_check.run_step("kl", [sys.executable, "-c", "raise SystemExit(3)"], 30, junit)
    assert failing["status"] == "failed (3)"


@pytest.mark.parametrize("script", ["bench_kl.py", "bench_cosine.py", "bench_finetune.py"])
def test_benchmarks_refuse_cuda_without_a_gpu(script):
    import subprocess

    if gpu_check.torch.cuda.is_available():
        pytest.skip("a GPU is present")
    done = subprocess.run([sys.executable, str(gpu_check.ROOT / "benchmarks" / script), "--device", "cuda", "--quick"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "no CUDA device" in done.stderr
