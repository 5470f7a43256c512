"""The ``refteacher finetune`` command."""
from __future__ import annotations

import argparse

from refteacher.engine.config_args import add_config_arguments, config_from_args
from refteacher.engine.finetune.config import FinetuneConfig
from refteacher.engine.finetune.trainer import run_finetune
from refteacher.engine.modeling.distributed import is_main_process


def add_finetune_cli(subparsers) -> None:
    """Register ``refteacher finetune``."""
    p = subparsers.add_parser(
        "finetune",
        help="LoRA-finetune a student on kept data, distilling the teacher's alignment (ReFT)",
        description=(
            "Finetune the student (base model + a fresh LoRA adapter) on the user's kept data with "
            "next-token cross-entropy on packed rows, plus lambda * KL(teacher || student) on the "
            "response tokens of alignment data: harmful prompts answered with refusals and harmless ones "
            "answered helpfully, so the student learns when to refuse and when to answer (without --align, "
            "built in: --align-rows rows, --align-helpful of them helpful). Writes "
            "OUT/adapter, OUT/finetune.json and OUT/checkpoints. With --baseline sft: plain LoRA "
            "finetuning on --data with no teacher."
        ),
    )
    add_config_arguments(p, FinetuneConfig)
    p.set_defaults(func=_cli_finetune)


def _cli_finetune(args: argparse.Namespace) -> int:
    config = config_from_args(FinetuneConfig, args)
    summary = run_finetune(config)
    if not is_main_process():  # one line per run, not per rank
        return 0
    final = ", ".join(f"{k} {v:.4f}" for k, v in summary["final"].items())
    print(f"finetuned {summary['mode']} for {summary['steps']} steps in {summary['seconds']:.0f} s ({final}); "
          f"adapter in {summary['adapter']}")
    return 0
