"""The ``refteacher eval`` command."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from refteacher.engine.errors import UserError
from refteacher.engine.evaluation.evaluate import evaluate, filter_metrics, read_scored_labels
from refteacher.engine.modeling.loading import DEFAULT_MODEL

# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def add_eval_cli(subparsers) -> None:
    """Register ``refteacher eval``."""
    p = subparsers.add_parser(
        "eval",
        help="harmful score, task accuracy and filter metrics of a model (+ LoRA adapter)",
        description=(
            "Evaluate a model, optionally with a LoRA adapter from `refteacher finetune`: the harmful "
            "score (fraction of harmful prompts answered rather than refused, greedy decoding) and "
            "the task accuracy (exact answers on a held-out task split). With --filter-scores, also "
            "the filter's AUROC, precision, recall, F1 and false-positive rate."
        ),
    )
    p.add_argument("--model", default=None, help="model directory, hub id or alias (default: the built-in model)")
    p.add_argument("--adapter", default=None, help="LoRA adapter directory (e.g. OUT/adapter of `refteacher finetune`)")
    p.add_argument("--harmful", default=None, help="held-out harmful prompts (JSONL/CSV/Parquet with a prompt field)")
    p.add_argument("--task", default=None, help="held-out task rows with prompt and answer fields")
    p.add_argument("--json", dest="json_path", default=None, help="write the report here as JSON")
    p.add_argument("--responses", default=None, help="write every prompt, response and verdict here (JSONL)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N rows of each file")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per harmful prompt")
    p.add_argument("--task-max-new-tokens", type=int, default=48, help="tokens generated per task prompt")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generation batch")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--filter-scores", default=None,
                   help="JSONL of filter scores with labels (fields --score-field, --label-field) for filter metrics")
    p.add_argument("--score-field", default="score", help="score field of --filter-scores rows")
    p.add_argument("--label-field", default="label", help="label field (harmful/benign, 1/0) of --filter-scores rows")
    p.add_argument("--threshold", type=float, default=None, help="filter threshold (default: the --teacher's)")
    p.add_argument("--teacher", default=None, help="teacher directory whose threshold --filter-scores uses")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    p.set_defaults(func=_cli_eval)


def _cli_eval(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be >= 1, got {args.limit}")
    report: dict[str, Any] = {}
    details: dict[str, list] = {}
    if args.harmful or args.task:
        report, details = evaluate(args.model or DEFAULT_MODEL, adapter=args.adapter, harmful=args.harmful,
                                   task=args.task, limit=args.limit, max_new_tokens=args.max_new_tokens,
                                   task_max_new_tokens=args.task_max_new_tokens, batch_size=args.batch_size,
                                   device=args.device, progress=args.progress)
    elif not args.filter_scores:
        raise UserError("nothing to evaluate: give --harmful FILE, --task FILE and/or --filter-scores FILE")
    if args.filter_scores:
        threshold = args.threshold
        if threshold is None:
            if not args.teacher:
                raise UserError("--filter-scores needs --threshold X or --teacher DIR (whose threshold is used)")
            from refteacher.engine.modeling.teacher_dir import read_manifest

            threshold = float(read_manifest(args.teacher)[0]["threshold"])
        scores, labels = read_scored_labels(args.filter_scores, args.score_field, args.label_field)
        report["filter"] = filter_metrics(scores, labels, threshold)
    if args.json_path:
        path = Path(args.json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
    if args.responses and details:
        with open(args.responses, "w", encoding="utf-8") as f:
            for kind, rows in details.items():
                for row in rows:
                    f.write(json.dumps({"kind": kind, **row}) + "\n")
    shown = {k: report[k] for k in ("harmful_score", "n_harmful", "task_accuracy", "n_task") if k in report}
    if "filter" in report:
        shown["filter"] = {k: report["filter"][k] for k in ("auroc", "precision", "recall", "f1", "fpr")}
    print(json.dumps(shown))
    return 0
