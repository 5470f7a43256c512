"""The finetune's configuration (``FinetuneConfig``) and the names of what it writes."""
from __future__ import annotations

import math
from dataclasses import dataclass

from refteacher.engine.errors import UserError

FORMAT = "refteacher.finetune/1"
ADAPTER_DIR = "adapter"
CHECKPOINT_DIR = "checkpoints"
SUMMARY_FILE = "finetune.json"
KL_DIRECTIONS = ("forward", "reverse", "jsd")
BASELINES = ("sft",)


@dataclass
class FinetuneConfig:
    """Everything a finetuning run needs; the CLI flags map one to one onto these fields."""

    data: str
    out: str
    student: str | None = None  # None: the teacher's model, else the default model
    teacher: str | None = None
    align: str | None = None
    baseline: str | None = None  # None (ReFT distillation) or "sft"
    lam: float = 1.0
    temperature: float = 1.0
    kl: str = "forward"
    beta: float = 0.5
    lora_r: int = 16
    lora_alpha: float | None = None  # None: 2 * lora_r
    lora_dropout: float = 0.0
    lora_targets: str = "all-linear"
    max_len: int = 1024
    align_max_len: int | None = None  # None: max_len
    rows_per_step: int = 1
    grad_accum: int = 1
    max_steps: int = 100
    learning_rate: float = 2e-4
    warmup_steps: int = 0
    weight_decay: float = 0.0
    save_steps: int = 50
    logging_steps: int = 10
    seed: int = 0
    resume: bool = False
    device: str | None = None
    chunk_size: int | None = None
    gradient_checkpointing: bool = False
    progress: bool = True

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
            if not self.align and self.lam > 0:
                raise UserError("distillation needs --align FILE (harmful prompts with refusals); "
                                "or set --lambda 0 to train without the KL term")
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
        if self.align_max_len is not None and self.align_max_len < 8:
            raise UserError(f"--align-max-len must be >= 8, got {self.align_max_len}")

    @property
    def distilling(self) -> bool:
        """True when the run has a teacher and a KL term."""
        return self.baseline is None and self.lam > 0
