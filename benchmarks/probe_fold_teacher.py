"""Where a category-fold teacher's misses come from, probed on teachers eval_teacher.py already built.

Two probes, on the fold's own left-out prompts (its category's harmful prompts, their topic-matched
harmless ones and the fixed everyday test rows):

- ``--layers L,...``: does harmfulness read better at another depth? At each layer, a
  difference-of-means direction from a seeded sample of the build's training prompts (``--sample``
  per class), its threshold by the build's rule (false-positive rate <= the build's target on a
  seeded sample of the harmless calibration prompts; no floor, as an untrained direction has no
  margin) and the fold's figures. Beside them, the teacher's own feature at its layer, calibrated
  on the same sample. The teacher's LoRA stops at its feature layer, so deeper layers are the
  untouched model's, run on the teacher's states.
- ``--refusals``: does the teacher refuse what its feature misses? It answers every test prompt
  (greedy, ``--answer-tokens`` new tokens); per side: how many its feature flags at the saved
  threshold, how many it refuses (``engine.judge.is_refusal``), either, and the prompts it refuses
  unflagged.

    python benchmarks/probe_fold_teacher.py no:stereotyping=runs/catfolds/teacher-stereotyping-0 \\
        --layers 12,16,20,24,28,30 --refusals --scores runs/rules/scores --json PATH
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_teacher import CATEGORY_FOLD, category_figures, category_fold_data, prompt_records  # noqa: E402
from harness import format_table, write_json  # noqa: E402
from threshold_rules import CATEGORY_SIDES, _scored, is_category_fold  # noqa: E402


def layer_rows(fold: str, teacher, records, layers: list[int], sample: int) -> list[dict]:
    """One row per layer in ``layers`` (difference of means) and one for the teacher's feature: the
    threshold from the calibration sample and the fold's figures at it (``category_figures``).
    ``teacher``: the fold's loaded ``Teacher``."""
    from refteacher.engine.modeling.forward import num_layers
    from refteacher.engine.teacher.calibration import calibrate
    from refteacher.engine.teacher.config import DEFAULT_TARGET_FPR, TeacherConfig
    from refteacher.engine.teacher.feature import collect_last_token_states, difference_of_means
    from refteacher.engine.teacher.training import teacher_data_for
    from refteacher.kernels.cosine import refusal_scores

    config = TeacherConfig.from_manifest(teacher.manifest["teacher"]["config"])
    bh, bb, *tests = category_fold_data(records, fold.removeprefix(CATEGORY_FOLD), config.seed)
    data = teacher_data_for(config, bh, bb)
    rng = random.Random(config.seed)
    sides = {side: rng.sample(prompts, min(sample, len(prompts))) for side, prompts in
             (("train_harmful", data.train_harmful), ("train_harmless", data.train_harmless),
              ("calib_harmful", data.calib_harmful), ("calib_harmless", data.calib_harmless))}
    sides.update({side: [r.prompt for r in rows] for side, rows in zip(CATEGORY_SIDES, tests)})
    depth, feature_layer = num_layers(teacher.model), teacher.layer
    too_deep = [layer for layer in layers if not 1 <= layer <= depth]
    if too_deep:
        raise SystemExit(f"--layers {too_deep}: the model has layers 1 to {depth}")
    read = sorted(set(layers) | {feature_layer})
    states = {side: collect_last_token_states(teacher.model, teacher.tokenizer, prompts, read, 32,
                                              max_tokens=config.max_prompt_tokens, progress=side)
              for side, prompts in sides.items()}
    target_fpr = config.target_fpr if config.target_fpr is not None else DEFAULT_TARGET_FPR
    rows = []
    for i, layer in enumerate(read):
        directions = [("difference of means", difference_of_means(states["train_harmful"][:, i],
                                                                  states["train_harmless"][:, i]))] if layer in layers else []
        if layer == feature_layer:
            directions.append(("teacher feature", teacher.feature))
        for name, direction in directions:
            scores = {side: refusal_scores(s[:, i].contiguous(), direction) for side, s in states.items()}
            threshold, calibration = calibrate(scores["calib_harmful"], scores["calib_harmless"], target_fpr=target_fpr)
            rows.append({"fold": fold, "layer": layer, "direction": name, "calib_auroc": calibration["auroc"],
                         **category_figures(*(scores[side] for side in CATEGORY_SIDES), threshold)})
    return rows


def refusal_rows(fold: str, teacher, records, scored: dict, answer_tokens: int) -> list[dict]:
    """Per test side: prompts, flagged by the feature at the saved threshold, refused by the teacher,
    either, and the prompts refused but not flagged. ``scored``: threshold_rules' scores of ``teacher``."""
    from refteacher.engine.judge import is_refusal
    from refteacher.engine.modeling.generation import generate

    tests = category_fold_data(records, fold.removeprefix(CATEGORY_FOLD), scored["seed"])[2:]
    rows = []
    for side, test_rows in zip(CATEGORY_SIDES, tests):
        prompts = [r.prompt for r in test_rows]
        answers = generate(teacher.model, teacher.tokenizer, prompts, max_new_tokens=answer_tokens, desc=side)
        flagged = (scored[side] >= scored["saved_threshold"]).tolist()
        refused = [is_refusal(answer) for answer in answers]
        rows.append({"fold": fold, "side": side, "prompts": len(prompts), "flagged": sum(flagged),
                     "refused": sum(refused), "either": sum(f or r for f, r in zip(flagged, refused)),
                     "refused_unflagged": sum(r and not f for f, r in zip(flagged, refused)),
                     "refused_unflagged_prompts": [p for p, f, r in zip(prompts, flagged, refused) if r and not f]})
    return rows


def main(argv=None) -> int:
    from refteacher.engine.data.hazard_taxonomy import CATEGORY_SLUGS
    from refteacher.engine.errors import UserError
    from refteacher.engine.modeling.teacher_dir import load_teacher

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("teachers", nargs="+", metavar="no:CATEGORY=DIR", help="a category fold and its teacher")
    p.add_argument("--layers", default="", help="layers to read a difference of means at (comma-separated)")
    p.add_argument("--sample", type=int, default=300,
                   help="--layers: prompts per side drawn from the build's training and calibration prompts")
    p.add_argument("--refusals", action="store_true", help="generate the teacher's answers and judge its refusals")
    p.add_argument("--answer-tokens", type=int, default=32, help="--refusals: new tokens per answer")
    p.add_argument("--scores", default=None, help="threshold_rules.py's score folder (reruns skip scoring)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    try:
        layers = [int(x) for x in args.layers.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--layers takes layer numbers, comma-separated; got {args.layers!r}") from None
    if not layers and not args.refusals:
        raise SystemExit("nothing to probe: give --layers, --refusals or both")
    if args.sample < 2 or args.answer_tokens < 1:
        raise SystemExit("--sample must be at least 2 and --answer-tokens at least 1")
    pairs = []
    for item in args.teachers:
        fold, sep, folder = item.partition("=")
        known = is_category_fold(fold) and fold.removeprefix(CATEGORY_FOLD) in CATEGORY_SLUGS
        if not sep or not known or not Path(folder).is_dir():
            raise SystemExit(f"expected {CATEGORY_FOLD}CATEGORY=TEACHER_DIR with a hazard category and an existing "
                             f"folder, got {item!r}")
        pairs.append((fold, folder))
    if args.threads:
        torch.set_num_threads(args.threads)
    _, taxonomy = prompt_records()
    result = {"layers": [], "refusals": []}
    for fold, folder in pairs:
        try:
            teacher = load_teacher(folder, device="cpu")  # once for both probes
            if layers:
                result["layers"] += layer_rows(fold, teacher, taxonomy, layers, args.sample)
            if args.refusals:
                scored = _scored(fold, folder, taxonomy, Path(args.scores) if args.scores else None)
                result["refusals"] += refusal_rows(fold, teacher, taxonomy, scored, args.answer_tokens)
        except UserError as error:
            raise SystemExit(f"{folder}: {error}") from None
    if result["layers"]:
        print(format_table(result["layers"], ["fold", "layer", "direction", "calib_auroc", "auroc", "recall",
                                              "fpr_topic", "fpr_everyday", "threshold"]))
    if result["refusals"]:
        print(format_table(result["refusals"], ["fold", "side", "prompts", "flagged", "refused", "either",
                                                "refused_unflagged"]))
    if args.json:
        write_json(args.json, {**result, "argv": sys.argv[1:] if argv is None else list(argv)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
