"""The ``refteacher feature`` and ``refteacher teacher`` commands."""
from __future__ import annotations

import argparse
import json
import time

from refteacher.engine import config_args
from refteacher.engine.config_args import add_config_arguments
from refteacher.engine.data.prompt_sets import BUILTIN_SETS
from refteacher.engine.errors import UserError
from refteacher.engine.modeling.distributed import is_main_process
from refteacher.engine.modeling.loading import DEFAULT_MODEL, load_model, load_tokenizer
from refteacher.engine.teacher.config import (
    DEFAULT_SETS,
    DEFAULT_TEST_FRACTION,
    TAXONOMY_DEFAULTS,
    TAXONOMY_SETS,
    FeatureConfig,
    TeacherConfig,
)
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
    add_config_arguments(parser, FeatureConfig)
    parser.set_defaults(func=run_feature_cli)


def run_feature_cli(args) -> int:
    """Run ``refteacher feature``; print the table and where the feature went. Returns 0."""
    args = config_args.config_from_args(FeatureConfig, args)
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

    ``--target-recall`` replaces the false-positive rule; ``--taxonomy`` changes the defaults of the
    options in TAXONOMY_DEFAULTS (those not given). Raises UserError for a threshold target out of range.
    """
    if args.target_fpr is not None and not 0.0 <= args.target_fpr < 1.0:
        raise UserError(f"--target-fpr must be in [0, 1), got {args.target_fpr}")
    if args.target_recall is not None and not 0.0 < args.target_recall <= 1.0:
        raise UserError(f"--target-recall must be in (0, 1], got {args.target_recall}")
    overrides = {"target_fpr": None} if args.target_recall is not None else {}
    defaults = TAXONOMY_DEFAULTS if args.taxonomy else {name: getattr(TeacherConfig, name) for name in TAXONOMY_DEFAULTS}
    overrides.update({name: value for name, value in defaults.items() if getattr(args, name) is None})
    return config_args.config_from_args(TeacherConfig, args, **overrides)


def _run_teacher(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if args.harmful or args.harmless:
        if not (args.harmful and args.harmless):
            raise UserError("give both --harmful and --harmless prompt sets (or neither, for the built-in sets)")
        if args.taxonomy:
            raise UserError("--taxonomy picks the built-in sets itself: drop --harmful/--harmless, or --taxonomy")
        harmful, harmless = load_labelled(args.harmful, args.harmless)
        test = []
    else:
        harmful, harmless, test = default_records(args.test_fraction, config.build_data_seed,
                                                  TAXONOMY_SETS if args.taxonomy else DEFAULT_SETS)
    result = train_teacher(args.model, harmful, harmless, args.out, config, progress=not args.quiet)
    if not is_main_process():  # every rank built the same teacher; one reports it
        return 0
    summary = {"teacher": str(result.path), "layer": result.layer, "threshold": result.threshold,
               "calibration": result.calibration, "build_seconds": round(result.seconds, 1)}
    if test:
        summary["held_out_test_prompts"] = len(test)
    print(json.dumps(summary, indent=2))
    return 0


def _builtin_sets_help() -> str:
    """The built-in prompt sets, one line each, and which of them a default build uses."""
    width = max(len(name) for name in BUILTIN_SETS)
    lines = ["built-in prompt sets (for --harmful / --harmless; hazard categories: "
             "engine/data/hazard_taxonomy.py, sources and licenses: docs/prompt_sources.md):"]
    lines += [f"  {name:<{width}}  {text}" for name, text in BUILTIN_SETS.items()]
    lines.append(f"default build: {', '.join(DEFAULT_SETS)}")
    lines.append(f"--taxonomy build: {', '.join(TAXONOMY_SETS)}")
    return "\n".join(lines)


def add_teacher_cli(subparsers) -> None:
    """Register ``refteacher teacher``."""
    p = subparsers.add_parser(
        "teacher", help="train a ReFT teacher (LoRA: refusal SFT + feature loss) and calibrate its threshold",
        description=(
            "Turn an instruction-tuned model into a ReFT teacher: LoRA trained with CE on refusals/own answers "
            "plus the refusal-feature loss, with rephrased prompts for generalisation; then calibrate the "
            "flagging threshold on a held-out split. With no --harmful/--harmless the built-in sets are used "
            "(minus a --test-fraction held out for evaluation). Resumes from its last checkpoint."
        ),
        epilog=_builtin_sets_help(),
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model directory, hub id or alias (default {DEFAULT_MODEL})")
    p.add_argument("--out", required=True, help="teacher directory to write")
    p.add_argument("--harmful", nargs="+", action="extend", default=[],
                   help="harmful prompt sets: built-in names, files (as `refteacher filter --input`) or hf:NAME")
    p.add_argument("--harmless", nargs="+", action="extend", default=[], help="harmless prompt sets, as --harmful")
    p.add_argument("--test-fraction", type=float, default=DEFAULT_TEST_FRACTION,
                   help="built-in data held out from building")
    p.add_argument("--taxonomy", action="store_true",
                   help="build on every hazard category: the default sets plus the red-team objectives, the "
                        "project's per-category requests and jailbreak framings, with a rank-16 adapter (about 1.8x "
                        "the default build's time: 18 minutes on 2 idle CPU cores; docs/teacher_quality.md)")
    # The options whose default --taxonomy changes are filled in by config_from_args: a value given wins either way.
    add_config_arguments(p, TeacherConfig, caller_defaults={
        name: f"default: {getattr(TeacherConfig, name)}; {value} with --taxonomy" for name, value in TAXONOMY_DEFAULTS.items()})
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_teacher)
