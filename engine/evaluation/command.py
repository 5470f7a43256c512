"""The ``refteacher eval`` command."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from refteacher.engine.config_args import add_config_arguments, config_from_args
from refteacher.engine.errors import UserError
from refteacher.engine.evaluation.config import EvalConfig
from refteacher.engine.evaluation.evaluate import evaluate, filter_metrics, read_scored_labels
from refteacher.engine.modeling.loading import DEFAULT_MODEL
from refteacher.engine.modeling.teacher_dir import read_manifest


def add_eval_cli(subparsers) -> None:
    """Register ``refteacher eval``."""
    p = subparsers.add_parser(
        "eval",
        help="harmful score, task accuracy and filter metrics of a model (+ LoRA adapter)",
        description=(
            "Evaluate a model, optionally with a LoRA adapter from `refteacher finetune`: the harmful "
            "score (fraction of harmful prompts answered rather than refused, greedy decoding), the "
            "fraction of harmless prompts answered (--benign: over-refusal) and "
            "the task accuracy (exact answers on a held-out task split). With --filter-scores, also "
            "the filter's AUROC, precision, recall, F1 and false-positive rate."
        ),
    )
    add_config_arguments(p, EvalConfig)
    p.set_defaults(func=_cli_eval)


def _cli_eval(args: argparse.Namespace) -> int:
    config = config_from_args(EvalConfig, args)
    return run_eval(config)


def run_eval(config: EvalConfig) -> int:
    """Evaluate as ``config`` asks, print the headline figures as JSON; return the exit status."""
    if config.limit is not None and config.limit < 1:
        raise UserError(f"--limit must be >= 1, got {config.limit}")
    report: dict[str, Any] = {}
    details: dict[str, list] = {}
    if config.harmful or config.task or config.benign:
        report, details = evaluate(config.model or DEFAULT_MODEL, adapter=config.adapter, harmful=config.harmful,
                                   benign=config.benign,
                                   task=config.task, limit=config.limit, max_new_tokens=config.max_new_tokens,
                                   task_max_new_tokens=config.task_max_new_tokens, batch_size=config.batch_size,
                                   device=config.device, progress=config.progress)
    elif not config.filter_scores:
        raise UserError("nothing to evaluate: give --harmful FILE, --benign FILE, --task FILE and/or --filter-scores FILE")
    if config.filter_scores:
        threshold = config.threshold
        if threshold is None:
            if not config.teacher:
                raise UserError("--filter-scores needs --threshold X or --teacher DIR (whose threshold is used)")
            threshold = float(read_manifest(config.teacher)[0]["threshold"])
        scores, labels = read_scored_labels(config.filter_scores, config.score_field, config.label_field)
        report["filter"] = filter_metrics(scores, labels, threshold)
    if config.json_path:
        path = Path(config.json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
    if config.responses and details:
        with open(config.responses, "w", encoding="utf-8") as f:
            for kind, rows in details.items():
                for row in rows:
                    f.write(json.dumps({"kind": kind, **row}) + "\n")
    shown = {k: report[k] for k in ("harmful_score", "n_harmful", "answers_benign", "n_benign", "task_accuracy", "n_task")
             if k in report}
    if "filter" in report:
        shown["filter"] = {k: report["filter"][k] for k in ("auroc", "precision", "recall", "f1", "fpr")}
    print(json.dumps(shown))
    return 0
