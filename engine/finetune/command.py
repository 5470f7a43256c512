"""The ``refteacher finetune`` command."""
from __future__ import annotations

import argparse

from refteacher.engine.finetune.config import BASELINES, KL_DIRECTIONS, FinetuneConfig
from refteacher.engine.finetune.trainer import run_finetune

# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def add_finetune_cli(subparsers) -> None:
    """Register ``refteacher finetune``."""
    p = subparsers.add_parser(
        "finetune",
        help="LoRA-finetune a student on kept data, distilling the teacher's alignment (ReFT)",
        description=(
            "Finetune the student (base model + a fresh LoRA adapter) on the user's kept data with "
            "next-token cross-entropy on packed rows, plus lambda * KL(teacher || student) on the "
            "response tokens of alignment data (harmful prompts answered with refusals). Writes "
            "OUT/adapter, OUT/finetune.json and OUT/checkpoints. With --baseline sft: plain LoRA "
            "finetuning on --data with no teacher."
        ),
    )
    p.add_argument("--student", default=None, help="student model (directory, hub id or alias); default: the teacher's model")
    p.add_argument("--teacher", default=None, help="teacher directory written by `refteacher teacher`")
    p.add_argument("--data", required=True, help="training rows (JSONL/CSV/Parquet, prompt+response or messages)")
    p.add_argument("--align", default=None, help="alignment rows: harmful prompts with refusal responses")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--lambda", dest="lam", type=float, default=1.0, help="weight of the KL term")
    p.add_argument("--temperature", type=float, default=1.0, help="distillation temperature (loss scaled by T^2)")
    p.add_argument("--kl", choices=KL_DIRECTIONS, default="forward", help="divergence: forward KL(teacher||student), reverse, or jsd")
    p.add_argument("--beta", type=float, default=0.5, help="teacher weight of the JSD mixture (--kl jsd)")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default 2 * rank)")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout")
    p.add_argument("--lora-targets", default="all-linear", help="comma-separated module names, or all-linear")
    p.add_argument("--max-len", type=int, default=1024, help="tokens per packed row (longer rows are truncated)")
    p.add_argument("--align-max-len", type=int, default=None, help="tokens per packed alignment row (default --max-len)")
    p.add_argument("--rows-per-step", type=int, default=1, help="packed rows per device per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--max-steps", type=int, default=100, help="optimiser steps")
    p.add_argument("--learning-rate", type=float, default=2e-4, help="peak learning rate (linear decay)")
    p.add_argument("--warmup-steps", type=int, default=0, help="learning-rate warm-up steps")
    p.add_argument("--save-steps", type=int, default=50, help="checkpoint every N steps")
    p.add_argument("--logging-steps", type=int, default=10, help="log losses every N steps")
    p.add_argument("--seed", type=int, default=0, help="random seed (LoRA init, data order)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in OUT/checkpoints")
    p.add_argument("--baseline", choices=BASELINES, default=None, help="sft: plain finetuning, no teacher (for comparison)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations to save memory")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    p.set_defaults(func=_cli_finetune)


def _cli_finetune(args: argparse.Namespace) -> int:
    names = {f.name for f in FinetuneConfig.__dataclass_fields__.values()}
    config = FinetuneConfig(**{k: v for k, v in vars(args).items() if k in names})
    summary = run_finetune(config)
    final = ", ".join(f"{k} {v:.4f}" for k, v in summary["final"].items())
    print(f"finetuned {summary['mode']} for {summary['steps']} steps in {summary['seconds']:.0f} s ({final}); "
          f"adapter in {summary['adapter']}")
    return 0
