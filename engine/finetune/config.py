"""The finetune's configuration (``FinetuneConfig``) and the names of what it writes."""
from __future__ import annotations

import math
from dataclasses import dataclass

from refteacher.engine.config_args import option
from refteacher.engine.errors import UserError

FORMAT = "refteacher.finetune/1"
ADAPTER_DIR = "adapter"
CHECKPOINT_DIR = "checkpoints"
PACKED_DIR = "packed"  # OUT/packed/{task,align}: the tokenised, packed rows (engine/finetune/dataset.py)
BUILTIN_ALIGN_FILE = "align.jsonl"  # OUT/align.jsonl: the built-in alignment rows, when no --align is given
SUMMARY_FILE = "finetune.json"
KL_DIRECTIONS = ("forward", "reverse", "jsd")
BASELINES = ("sft",)


@dataclass
class FinetuneConfig:
    """Everything a finetuning run needs; ``refteacher finetune`` has one option per field."""

    data: str = option(help="training rows (JSONL/CSV/Parquet/hf:NAME, prompt+response or messages; or a Parquet "
                            "file tokenised already: input_ids, optional labels)")
    out: str = option(help="output directory")
    student: str | None = option(None, "student model (directory, hub id or alias); default: the teacher's model")
    teacher: str | None = option(None, "teacher directory written by `refteacher teacher`")
    align: str | None = option(
        None, "alignment rows the KL term distils on: harmful prompts with refusals and harmless ones with helpful "
              "answers (default: built in, --align-rows of them from the built-in sets, the helpful answers the "
              "student's own; written to OUT/align.jsonl)")
    align_rows: int = option(192, "rows of the built-in alignment data (without --align)")
    align_helpful: float = option(0.75, "share of the built-in alignment rows that are harmless prompts with helpful "
                                        "answers; the rest are harmful prompts with refusals (without --align; "
                                        "chosen in docs/helpfulness.md)")
    baseline: str | None = option(None, "sft: plain finetuning, no teacher (for comparison)", choices=BASELINES)
    lam: float = option(3.0, "weight of the KL term (chosen in docs/helpfulness.md)", flag="--lambda")
    temperature: float = option(1.0, "distillation temperature (loss scaled by T^2)")
    kl: str = option("forward", "divergence: forward KL(teacher||student), reverse, or jsd", choices=KL_DIRECTIONS)
    beta: float = option(0.5, "teacher weight of the JSD mixture (--kl jsd)")
    lora_r: int = option(16, "LoRA rank")
    lora_alpha: float | None = option(None, "LoRA alpha (default 2 * rank)")
    lora_dropout: float = option(0.0, "LoRA dropout")
    lora_targets: str = option("all-linear", "comma-separated module names, or all-linear")
    max_len: int = option(1024, "tokens per packed row (longer rows are truncated)")
    align_max_len: int | None = option(None, "tokens per packed alignment row (default --max-len)")
    rows_per_step: int = option(1, "packed rows per device per micro-batch")
    grad_accum: int = option(1, "gradient accumulation steps")
    max_steps: int = option(100, "optimiser steps")
    learning_rate: float = option(2e-4, "peak learning rate (linear decay)")
    warmup_steps: int = option(0, "learning-rate warm-up steps")
    weight_decay: float = option(0.0, "AdamW weight decay")
    save_steps: int = option(50, "checkpoint every N steps")
    logging_steps: int = option(10, "log losses every N steps")
    seed: int = option(0, "random seed (LoRA init, data order)")
    resume: bool = option(False, "continue from the latest checkpoint in OUT/checkpoints")
    device: str | None = option(None, "cpu, cuda, cuda:1 ... (default: cuda if available)")
    chunk_size: int | None = option(None, "tokens per chunk of the fused losses (default: picked per device)")
    gradient_checkpointing: bool = option(False, "recompute activations to save memory")
    progress: bool = option(True, "hide the progress bar", flag="--no-progress")

    def check(self) -> None:
        """Raise UserError for inconsistent or out-of-range settings, saying how to fix them."""
        if self.baseline is not None and self.baseline not in BASELINES:
            raise UserError(f"--baseline must be one of {', '.join(BASELINES)}, got {self.baseline!r}")
        if self.baseline == "sft":
            if self.teacher or self.align:
                raise UserError("--baseline sft trains without a teacher: drop --teacher and --align")
        else:
            if not self.teacher:
                raise UserError("finetuning with distillation needs --teacher DIR (or pass --baseline sft)")
        if self.kl not in KL_DIRECTIONS:
            raise UserError(f"--kl must be one of {', '.join(KL_DIRECTIONS)}, got {self.kl!r}")
        if self.kl == "jsd" and not 0 < self.beta < 1:
            raise UserError(f"--beta must lie strictly between 0 and 1 for --kl jsd, got {self.beta}")
        checks = [
            ("--lambda", self.lam, self.lam >= 0 and math.isfinite(self.lam), ">= 0"),
            ("--temperature", self.temperature, self.temperature > 0 and math.isfinite(self.temperature), "> 0"),
            ("--lora-r", self.lora_r, self.lora_r >= 1, ">= 1"),
            ("--max-len", self.max_len, self.max_len >= 8, ">= 8"),
            ("--rows-per-step", self.rows_per_step, self.rows_per_step >= 1, ">= 1"),
            ("--grad-accum", self.grad_accum, self.grad_accum >= 1, ">= 1"),
            ("--max-steps", self.max_steps, self.max_steps >= 1, ">= 1"),
            ("--learning-rate", self.learning_rate, self.learning_rate > 0, "> 0"),
        ]
        for flag, value, ok, rule in checks:
            if not ok:
                raise UserError(f"{flag} must be {rule}, got {value}")
        if self.align_rows < 1 or not 0.0 <= self.align_helpful <= 1.0:
            raise UserError(f"--align-rows must be >= 1 and --align-helpful in [0, 1], got {self.align_rows} "
                            f"and {self.align_helpful}")
        if self.align_max_len is not None and self.align_max_len < 8:
            raise UserError(f"--align-max-len must be >= 8, got {self.align_max_len}")

    @property
    def distilling(self) -> bool:
        """True when the run has a teacher and a KL term."""
        return self.baseline is None and self.lam > 0
