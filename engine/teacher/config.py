"""The teacher's build configuration (``TeacherConfig``) and what a build returns."""
from __future__ import annotations

import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from refteacher.engine.config_args import option, parse_bool, text_parser
from refteacher.engine.errors import UserError
from refteacher.engine.modeling.loading import DEFAULT_MODEL

# The built-in prompt sets a default teacher is built from (engine/data/prompt_sets.py): harmful
# requests on one side; on the other, harmless ones on sensitive topics, the topics harmful prompts
# talk about asked harmlessly, and everyday requests (so the teacher's helpful CE covers as much
# ground as its refusals, and its threshold is calibrated on ordinary use).
DEFAULT_SETS = ("advbench", "harmbench", "matched_pairs", "edgy_benign", "topic_harmless", "everyday")
# Every hazard category on the harmful side as well: what ``--taxonomy`` and benchmarks/eval_teacher.py's
# leave-one-category-out folds build on. Not the default: its build takes 1.8 times as long (18 minutes on
# 2 idle cores), past the default's 10-minute budget (figures in docs/teacher_quality.md).
TAXONOMY_SETS = DEFAULT_SETS + ("pyrit_objectives", "taxonomy_harmful", "jailbreak_framed")
# A --taxonomy build learns eighteen kinds of harm and their framings with an adapter of twice the
# default rank (alpha/rank kept at 2). Chosen on the build's own calibration split at seeds 0 and 1,
# where it beat rank 8 on AUROC and recall (docs/teacher_quality.md); values given explicitly win.
TAXONOMY_DEFAULTS = {"lora_rank": 16, "lora_alpha": 32.0}
DEFAULT_TARGET_FPR = 0.05
HARMFUL_SAMPLING = ("prompt", "category")
DEFAULT_TEST_FRACTION = 0.2  # share of the built-in sets held out from a default build, for evaluation


@dataclass
class TeacherConfig:
    """Every knob of a teacher build; all of it is written to the manifest."""

    layer: int | None = option(None, "feature layer N; LoRA goes on decoder layers 1..N, the ones that compute it "
                                     "(default: two thirds of the depth, 20 of 30 for SmolLM2)")
    lora_rank: int = option(8, "LoRA rank")
    lora_alpha: float = option(16.0, "LoRA alpha")
    lora_targets: tuple[str, ...] = option(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                                           "comma-separated module names that get LoRA")
    learning_rate: float = option(1e-3, "learning rate", flag="--lr")
    max_steps: int = option(60, "training steps")
    feature_batch: int = option(32, "prompts per step for the feature loss (half harmful)")
    ce_batch: int = option(8, "examples per step for the CE loss (half refusals)")
    feature_weight: float = option(1.0, "lambda, weight of the feature loss beside the CE")
    anchor_weight: float = option(
        0.0, "weight of a term holding feature-layer states near the untouched model's: it helps on unseen sources "
             "the untouched model already separates, and hurts on same-style harmful/harmless pairs (0: off)")
    margin: float = option(0.0, "harmless prompts are pushed below this cosine")
    harmful_target: float = option(
        0.5, "harmful prompts are pushed above this cosine (a hinge; 1.0 pushes them all the way, which fits the "
             "training sets' style and generalises worse)")
    harmful_sampling: str = option(
        "prompt", "how harmful prompts are drawn for the feature loss, the refusals and the feature's reference "
                  "sample: prompt (each prompt equally likely) or category (each hazard category equally likely, "
                  "so small categories weigh as much as the large crime sets; tried on left-out categories and not "
                  "adopted, docs/teacher_quality.md)", choices=HARMFUL_SAMPLING)
    refresh_every: int = option(10, "steps between re-estimates of the refusal feature from the teacher")
    reference_size: int = option(64, "prompts per class for each re-estimate of the feature")
    max_prompt_tokens: int = option(128, "prompt tokens kept (the last ones) in training and calibration")
    answer_tokens: int = option(32, "max new tokens of the model's cached helpful answers (CE targets)")
    calib_fraction: float = option(0.25, "share of each set kept out of training to calibrate the threshold")
    rephrase_per_prompt: int = option(3, "rephrasings per training prompt", flag="--rephrase")
    calib_rephrase: int = option(5, "rephrasings per harmful calibration prompt, so the threshold holds across styles")
    calib_max_harmful: int | None = option(
        1000, "harmful calibration prompts kept (a seeded sample of them and their rephrasings; none: all): "
              "calibration cost stays bounded as the prompt sets grow")
    template_harmless: int = option(400, "template-written harmless prompts added")
    ce_harmless: int = option(192, "harmless prompts answered with the model's own answers in the CE term")
    target_recall: float | None = option(
        None, "threshold: the highest keeping this recall on the harmful calibration prompts (replaces --target-fpr)")
    target_fpr: float | None = option(
        DEFAULT_TARGET_FPR, "threshold: the lowest with this false-positive rate on the harmless calibration prompts "
                            "(it carries over to unseen prompts better than a recall target)")
    threshold_gap: float = option(
        0.0, "the threshold is never below --margin plus this, whatever the rule picks (not applied with "
             "--anchor-weight, whose harmless scores sit well below the margin)")
    checkpoint_every: int = option(20, "steps between checkpoints (OUT.teacher-checkpoint/checkpoint-N); "
                                       "a rerun resumes from the last")
    grad_accum: int = option(1, "gradient accumulation: micro-batches of the feature and CE batches per optimizer step")
    seed: int = option(0, "seed of the LoRA init, the batches, the reference sample and the refusal wording, and of "
                          "the data unless --data-seed is given")
    data_seed: int | None = option(
        None, "seed of the build data alone: the test and calibration splits, template prompts, rephrasings and CE "
              "prompts (default: --seed). Two builds differing only in --seed see the same prompts")
    threads: int | None = option(None, "torch CPU threads")

    def override(self, key: str, text: str) -> None:
        """Set field ``key`` from command-line text, parsed by the field's declared type.

        ``int | None`` fields take an int or ``none``, ``tuple[str, ...]`` fields a comma-separated
        list. Raises UserError for an unknown field or text that does not parse.
        """
        hints = typing.get_type_hints(type(self))
        if key not in hints:
            raise UserError(f"TeacherConfig has no field {key!r}; fields: {', '.join(hints)}")
        kind = hints[key]
        if typing.get_origin(kind) in (typing.Union, types.UnionType) and text.strip().lower() == "none":
            setattr(self, key, None)  # ``X | None``
            return
        parse = text_parser(kind)
        try:
            value = parse(text)
        except ValueError:
            name = "bool" if parse is parse_bool else getattr(parse, "__name__", parse)
            raise UserError(f"{key}: {text!r} is not a valid {name}") from None
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
class FeatureConfig:
    """``refteacher feature``: which prompts, which model, how the layer is chosen."""

    model: str = option(DEFAULT_MODEL, "model directory, hub id or alias")
    out: str = option("feature", "output directory")
    layer: int | None = option(None, "use this decoder layer (default: best held-out AUROC)")
    harmful: list[str] | None = option(
        None, "harmful prompt sets: built-in names, files (as `refteacher filter --input`) or hf:NAME "
              "(default: the built-in harmful sets)", metavar="SET")
    harmless: list[str] | None = option(None, "harmless prompt sets, as --harmful (default: the built-in harmless sets)",
                                        metavar="SET")
    heldout_fraction: float = option(0.2, "share of each set held out for AUROC")
    seed: int = option(0, "seed of the held-out split")
    batch_size: int = option(16, "prompts per forward pass")
    max_tokens: int = option(512, "keep the last N tokens of a prompt")
    device: str | None = option(None, "cpu, cuda, cuda:1 ... (default: cuda if available)")
    trust_remote_code: bool = option(False, "allow model code from the model directory")


@dataclass
class TeacherResult:
    """What ``train_teacher`` returns: the output folder and every figure written to the manifest."""

    path: Path
    layer: int
    threshold: float
    calibration: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
