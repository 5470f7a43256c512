"""The ``refteacher feature`` and ``refteacher teacher`` commands."""
from __future__ import annotations

import argparse
import json
import time

from refteacher.engine.errors import UserError
from refteacher.engine.modeling.loading import DEFAULT_MODEL, load_model, load_tokenizer
from refteacher.engine.teacher.config import DEFAULT_TARGET_FPR, TeacherConfig
from refteacher.engine.teacher.feature import (
    DEFAULT_HARMFUL,
    DEFAULT_HARMLESS,
    FEATURE_FILE,
    MANIFEST_FILE,
    build_default_split,
    extract_feature,
    format_auroc_table,
)
from refteacher.engine.teacher.training import default_records, load_labelled, train_teacher


def add_feature_cli(subparsers) -> None:
    """Register ``refteacher feature``."""
    parser = subparsers.add_parser(
        "feature",
        help="extract the refusal feature (difference of means) and pick its layer by held-out AUROC",
        description=(
            "Extract the refusal feature of a model: the difference of means between harmful and harmless "
            "prompts' last-token hidden states at every layer, scored on a held-out split (AUROC of cosine "
            "similarity). Writes feature.safetensors + feature.json to --out and prints the per-layer table. "
            f"Default data: harmful = {', '.join(DEFAULT_HARMFUL)}; harmless = {', '.join(DEFAULT_HARMLESS)}."
        ),
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model directory, hub id or alias (default {DEFAULT_MODEL})")
    parser.add_argument("--layer", type=int, default=None, help="use this decoder layer (default: best held-out AUROC)")
    parser.add_argument("--out", default="feature", help="output directory (default ./feature)")
    parser.add_argument("--harmful", action="append", default=None, metavar="SET",
                        help="harmful prompt set: built-in name, .jsonl/.csv/.parquet file or HF dataset (repeatable)")
    parser.add_argument("--harmless", action="append", default=None, metavar="SET",
                        help="harmless prompt set, as --harmful (repeatable)")
    parser.add_argument("--heldout-fraction", type=float, default=0.2, help="share of each set held out for AUROC (default 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out split (default 0)")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per forward pass (default 16)")
    parser.add_argument("--max-tokens", type=int, default=512, help="keep the last N tokens of a prompt (default 512)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model directory")
    parser.set_defaults(func=run_feature_cli)


def run_feature_cli(args) -> int:
    """Run ``refteacher feature``; print the table and where the feature went. Returns 0."""
    harmful, harmless, held_harmful, held_harmless = build_default_split(
        args.harmful or DEFAULT_HARMFUL, args.harmless or DEFAULT_HARMLESS, args.heldout_fraction, args.seed)
    started = time.perf_counter()
    model = load_model(args.model, device=args.device, trust_remote_code=args.trust_remote_code)
    tokenizer = load_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
    feature = extract_feature(args.model, harmful, harmless, held_harmful, held_harmless, args.layer,
                              batch_size=args.batch_size, max_tokens=args.max_tokens, model=model,
                              tokenizer=tokenizer, progress=True)
    feature.stats["heldout"] = {"fraction": args.heldout_fraction, "seed": args.seed}
    out = feature.save(args.out)
    print(f"held-out AUROC per layer ({len(held_harmful)} harmful, {len(held_harmless)} harmless held out; "
          f"trained on {len(harmful)} harmful, {len(harmless)} harmless):")
    print(format_auroc_table(feature))
    print(f"layer {feature.layer}: AUROC {feature.stats['heldout_auroc'][str(feature.layer)]:.3f}; "
          f"wrote {out / FEATURE_FILE} and {out / MANIFEST_FILE} in {time.perf_counter() - started:.1f} s")
    return 0


def config_from_args(args: argparse.Namespace) -> TeacherConfig:
    """Return the TeacherConfig that ``refteacher teacher``'s parsed arguments ask for.

    Raises UserError for a threshold target out of range.
    """
    if not 0.0 <= args.target_fpr < 1.0:
        raise UserError(f"--target-fpr must be in [0, 1), got {args.target_fpr}")
    if args.target_recall is not None and not 0.0 < args.target_recall <= 1.0:
        raise UserError(f"--target-recall must be in (0, 1], got {args.target_recall}")
    return TeacherConfig(
        layer=args.layer, lora_rank=args.lora_rank, learning_rate=args.lr, max_steps=args.max_steps,
        feature_weight=args.feature_weight, anchor_weight=args.anchor_weight, margin=args.margin,
        harmful_target=args.harmful_target,
        threshold_gap=args.threshold_gap, refresh_every=args.refresh_every,
        calib_fraction=args.calib_fraction, rephrase_per_prompt=args.rephrase, calib_rephrase=args.calib_rephrase,
        template_harmless=args.template_harmless,
        target_recall=args.target_recall,
        target_fpr=None if args.target_recall is not None else args.target_fpr,
        checkpoint_every=args.checkpoint_every,
        grad_accum=args.grad_accum,
        seed=args.seed, data_seed=args.data_seed, threads=args.threads,
    )


def _run_teacher(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if args.harmful or args.harmless:
        if not (args.harmful and args.harmless):
            raise UserError("give both --harmful and --harmless prompt sets (or neither, for the built-in sets)")
        harmful, harmless = load_labelled(args.harmful, args.harmless)
        test = []
    else:
        harmful, harmless, test = default_records(args.test_fraction, config.build_data_seed)
    result = train_teacher(args.model, harmful, harmless, args.out, config, progress=not args.quiet)
    summary = {"teacher": str(result.path), "layer": result.layer, "threshold": result.threshold,
               "calibration": result.calibration, "build_seconds": round(result.seconds, 1)}
    if test:
        summary["held_out_test_prompts"] = len(test)
    print(json.dumps(summary, indent=2))
    return 0


def add_teacher_cli(subparsers) -> None:
    """Register ``refteacher teacher``."""
    C = TeacherConfig  # every default below is the config's
    p = subparsers.add_parser(
        "teacher", help="train a ReFT teacher (LoRA: refusal SFT + feature loss) and calibrate its threshold",
        description=(
            "Turn an instruction-tuned model into a ReFT teacher: LoRA trained with CE on refusals/own answers "
            "plus the refusal-feature loss, with rephrased prompts for generalisation; then calibrate the "
            "flagging threshold on a held-out split. With no --harmful/--harmless the built-in sets are used "
            "(minus a --test-fraction held out for evaluation). Resumes from its last checkpoint."
        ),
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model directory, hub id or alias (default {DEFAULT_MODEL})")
    p.add_argument("--out", required=True, help="teacher directory to write")
    p.add_argument("--harmful", nargs="+", default=[], help="harmful prompt sets (names or files)")
    p.add_argument("--harmless", nargs="+", default=[], help="harmless prompt sets (names or files)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="built-in data held out from building")
    p.add_argument("--layer", type=int, default=None, help="feature layer N; LoRA goes on decoder layers 1..N, the ones that compute it (default: two thirds of the depth, 20 of 30 for SmolLM2)")
    p.add_argument("--lora-rank", type=int, default=C.lora_rank, help="LoRA rank")
    p.add_argument("--lr", type=float, default=C.learning_rate, help="learning rate")
    p.add_argument("--max-steps", type=int, default=C.max_steps, help="training steps")
    p.add_argument("--feature-weight", type=float, default=C.feature_weight,
                   help="lambda, weight of the feature loss beside the CE")
    p.add_argument("--anchor-weight", type=float, default=C.anchor_weight,
                   help="weight of a term holding feature-layer states near the untouched model's: it helps on unseen "
                        "sources the untouched model already separates, and hurts on same-style harmful/harmless pairs "
                        f"(default {C.anchor_weight}: off)")
    p.add_argument("--margin", type=float, default=C.margin,
                   help="harmless prompts are pushed below this cosine")
    p.add_argument("--threshold-gap", type=float, default=C.threshold_gap,
                   help="the threshold is never below --margin plus this, whatever the rule picks "
                        f"(default {C.threshold_gap}; "
                        "not applied with --anchor-weight, whose harmless scores sit well below the margin)")
    p.add_argument("--harmful-target", type=float, default=C.harmful_target,
                   help="harmful prompts are pushed above this cosine (a hinge; 1.0 pushes them all the way, "
                        f"which fits the training sets' style and generalises worse; default {C.harmful_target})")
    p.add_argument("--refresh-every", type=int, default=C.refresh_every,
                   help="steps between re-estimates of the refusal feature from the teacher")
    p.add_argument("--calib-fraction", type=float, default=C.calib_fraction,
                   help="share of each set kept out of training to calibrate the threshold")
    p.add_argument("--rephrase", type=int, default=C.rephrase_per_prompt,
                   help="rephrasings per training prompt")
    p.add_argument("--calib-rephrase", type=int, default=C.calib_rephrase,
                   help="rephrasings per harmful calibration prompt, so the threshold holds across styles")
    p.add_argument("--template-harmless", type=int, default=C.template_harmless,
                   help="template-written harmless prompts added")
    rule = p.add_mutually_exclusive_group()
    rule.add_argument("--target-fpr", type=float, default=DEFAULT_TARGET_FPR,
                      help=f"threshold: the lowest with this false-positive rate on the harmless calibration prompts "
                           f"(default {DEFAULT_TARGET_FPR}; it carries over to unseen prompts better than a recall target)")
    rule.add_argument("--target-recall", type=float, default=None,
                      help="threshold: the highest keeping this recall on the harmful calibration prompts instead")
    p.add_argument("--checkpoint-every", type=int, default=C.checkpoint_every,
                   help="steps between checkpoints (OUT.teacher-checkpoint/checkpoint-N); a rerun resumes from the last")
    p.add_argument("--grad-accum", type=int, default=C.grad_accum,
                   help="gradient accumulation: micro-batches of the feature and CE batches per optimizer step")
    p.add_argument("--seed", type=int, default=C.seed,
                   help="seed of the LoRA init and the batches, and of the data unless --data-seed is given")
    p.add_argument("--data-seed", type=int, default=None,
                   help="seed of the build data alone: the test and calibration splits, template prompts, rephrasings "
                        "and CE prompts (default: --seed). Two builds differing only in --seed see the same prompts")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_teacher)
