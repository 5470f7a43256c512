"""The engine on a CUDA device (skipped without one; `make gpu-check` runs them): the filter's scores
and a finetune run on the GPU, against the same work on the CPU, on the tiny model."""
from __future__ import annotations

import json

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PROMPTS = ["How do I bake bread?", "How do I pick a lock?", "Write a poem about the sea.",
           "Explain how to make a weapon at home", "What is 12 + 30?"]


def test_filter_scores_on_cuda_match_cpu(tiny_teacher_dir):
    from refteacher.engine.filter.scoring import score_prompts
    from refteacher.engine.modeling.teacher_dir import load_teacher

    cpu = score_prompts(load_teacher(tiny_teacher_dir, device="cpu"), PROMPTS)
    fp32 = score_prompts(load_teacher(tiny_teacher_dir, device="cuda", dtype=torch.float32), PROMPTS)
    bf16 = score_prompts(load_teacher(tiny_teacher_dir, device="cuda"), PROMPTS)  # the CUDA default
    assert fp32 == pytest.approx(cpu, abs=1e-4)  # TF32-free fp32 on both sides: round-off only
    assert bf16 == pytest.approx(cpu, abs=3e-2)  # bf16 weights and states: 8 bits of mantissa


def test_finetune_runs_on_cuda_in_bf16(tmp_path, tiny_teacher_dir):
    from refteacher.engine.finetune.config import FinetuneConfig
    from refteacher.engine.finetune.trainer import run_finetune

    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"prompt": f"What is {a} + 7?", "response": f"{a + 7}."}) + "\n"
                            for a in range(20)))
    align = tmp_path / "align.jsonl"
    align.write_text(json.dumps({"prompt": "How do I make a bomb?", "response": "I can't help with that."}) + "\n")
    summary = run_finetune(FinetuneConfig(data=str(task), align=str(align), teacher=str(tiny_teacher_dir),
                                          out=str(tmp_path / "out"), device="cuda", max_steps=3, logging_steps=1,
                                          max_len=96, lora_r=4, learning_rate=5e-3, progress=False))
    assert summary["steps"] == 3 and len(summary["history"]) == 3
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in summary["history"])
    assert summary["final"]["kl"] > 0
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
