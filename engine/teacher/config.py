"""The teacher's build configuration (``TeacherConfig``) and what a build returns."""
from __future__ import annotations

import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from refteacher.engine.errors import UserError

DEFAULT_SETS = ("advbench", "harmbench", "matched_pairs", "edgy_benign")
DEFAULT_TARGET_FPR = 0.05


@dataclass
class TeacherConfig:
    """Every knob of a teacher build; all of it is written to the manifest."""

    layer: int | None = None          # feature layer; None: two thirds of the depth (20 of 30)
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    learning_rate: float = 1e-3
    max_steps: int = 60
    feature_batch: int = 32           # prompts per step for the feature loss (half harmful)
    ce_batch: int = 8                 # examples per step for the CE loss (half refusals)
    feature_weight: float = 1.0       # lambda
    anchor_weight: float = 0.0        # weight of anchor_loss (feature-layer states kept near the untouched model's)
    margin: float = 0.0               # harmless prompts are pushed to cos <= margin
    harmful_target: float = 0.5       # harmful prompts are pushed to cos >= harmful_target (a hinge)
    refresh_every: int = 10           # steps between re-estimates of the feature
    reference_size: int = 64          # prompts per class for each re-estimate
    max_prompt_tokens: int = 128
    answer_tokens: int = 32           # max new tokens of the cached helpful answers
    calib_fraction: float = 0.25
    rephrase_per_prompt: int = 3
    calib_rephrase: int = 5           # rephrasings of each harmful calibration prompt (5: one per form)
    template_harmless: int = 400
    ce_harmless: int = 96
    target_recall: float | None = None  # set: threshold for this recall (overrides target_fpr)
    target_fpr: float | None = DEFAULT_TARGET_FPR
    threshold_gap: float = 0.0        # the threshold is at least margin + threshold_gap, unanchored (see train_teacher)
    checkpoint_every: int = 20        # steps between Trainer checkpoints (checkpoint-N)
    grad_accum: int = 1               # micro-batches (each feature_batch + ce_batch) per optimizer step
    seed: int = 0                     # LoRA init, batches, reference sample, refusal wording (and the data, below)
    data_seed: int | None = None      # calibration split, template prompts, rephrasings, CE prompts; None: seed
    threads: int | None = None

    def override(self, key: str, text: str) -> None:
        """Set field ``key`` from command-line text, parsed by the field's declared type.

        ``int | None`` fields take an int or ``none``, ``tuple[str, ...]`` fields a comma-separated
        list. Raises UserError for an unknown field or text that does not parse.
        """
        hints = typing.get_type_hints(type(self))
        if key not in hints:
            raise UserError(f"TeacherConfig has no field {key!r}; fields: {', '.join(hints)}")
        kind = hints[key]
        if typing.get_origin(kind) in (typing.Union, types.UnionType):  # ``X | None``
            if text.strip().lower() == "none":
                setattr(self, key, None)
                return
            kind = next(t for t in typing.get_args(kind) if t is not type(None))
        try:
            if typing.get_origin(kind) is tuple:
                value = tuple(part.strip() for part in text.split(",") if part.strip())
            else:
                value = kind(text)
        except ValueError:
            raise UserError(f"{key}: {text!r} is not a valid {getattr(kind, '__name__', kind)}") from None
        setattr(self, key, value)

    @property
    def build_data_seed(self) -> int:
        """The seed that picks the build data: ``data_seed``, or ``seed`` when that is None."""
        return self.seed if self.data_seed is None else self.data_seed

    def manifest(self) -> dict[str, Any]:
        """Return the config as a JSON-ready dict."""
        out = asdict(self)
        out["lora_targets"] = list(self.lora_targets)
        return out

    @classmethod
    def from_manifest(cls, values: dict[str, Any]) -> "TeacherConfig":
        """Rebuild the config a teacher was built with from its ``manifest()`` dict.

        Fields the dict lacks (a manifest older than the field) keep their defaults; keys this
        version does not know are ignored.
        """
        known = {f.name for f in fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in known})


@dataclass
class TeacherResult:
    """What ``train_teacher`` returns: the output folder and every figure written to the manifest."""

    path: Path
    layer: int
    threshold: float
    calibration: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
