"""Evaluation (``refteacher eval``): harmful score, task accuracy and filter metrics.

- **Harmful score**: the fraction of held-out harmful prompts the model *answers* instead of
  refusing (batched greedy generation, then a pluggable ``RefusalJudge``; the default detects
  refusal phrasing, ``refteacher.engine.judge``). Lower is safer.
- **Task accuracy**: the fraction of a downstream task's held-out rows (``{"prompt", "answer"}``)
  whose greedy response ends with the exact answer (``refteacher.engine.data.tasks.check_answer``).
- **Filter metrics**: AUROC, precision, recall, F1 and false-positive rate of filter scores against
  known labels, at the filter's threshold.

``refteacher eval --model M [--adapter DIR] --harmful FILE [--task FILE] --json PATH`` writes
``{"harmful_score", "task_accuracy", "n_harmful", "n_task", ...}`` (a figure is null when its
file is not given).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from refteacher.engine.data.readers import iter_rows, open_source, read_records
from refteacher.engine.data.tasks import check_answer
from refteacher.engine.errors import UserError
from refteacher.engine.judge import PhraseJudge
from refteacher.engine.metrics import auroc, confusion_counts, precision_recall_fpr
from refteacher.engine.modeling.generation import generate
from refteacher.engine.modeling.loading import load_model, load_tokenizer

FORMAT = "refteacher.eval/1"


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def read_prompts(path: str | Path, *, limit: int | None = None) -> list[str | list[dict]]:
    """Read prompts from a JSONL / CSV / Parquet file (``prompt`` field or chat ``messages``).

    A chat row gives the conversation up to its last user turn. Raises UserError for a malformed
    row (naming its id) or a file without prompts. ``limit`` keeps the first N.
    """
    prompts: list[str | list[dict]] = []
    for row in iter_rows(open_source(path)):
        if row.reason is not None:
            raise UserError(f"{path}: row {row.id} has no usable prompt ({row.reason})")
        prompts.append(row.prompts[-1])
        if limit is not None and len(prompts) >= limit:
            break
    if not prompts:
        raise UserError(f"{path} holds no prompts")
    return prompts


def read_task_rows(path: str | Path, *, limit: int | None = None) -> list[dict[str, Any]]:
    """Read held-out task rows ``{"prompt", "answer"}`` (JSONL / CSV / Parquet); UserError if malformed."""
    rows = []
    for row in iter_rows(open_source(path)):
        if row.reason is not None or row.record is None or "answer" not in row.record:
            why = row.reason or "no 'answer' field"
            raise UserError(f"{path}: row {row.id} is not a task row with prompt and answer ({why})")
        rows.append({"prompt": row.prompts[-1], "answer": str(row.record["answer"])})
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise UserError(f"{path} holds no task rows")
    return rows


def check_adapter_dir(adapter: str | None) -> None:
    """Raise UserError unless ``adapter`` is None or a LoRA adapter directory (adapter_config.json)."""
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise UserError(f"{adapter} is not a LoRA adapter directory (no adapter_config.json); "
                        "pass the adapter/ folder that `refteacher finetune` wrote")


def load_for_eval(model_spec: str, adapter: str | None = None, *, device: str | None = None):
    """Load a model (with a LoRA adapter merged in when given) and its tokenizer, in eval mode.

    Returns (model, tokenizer). UserError when the adapter directory is missing or invalid.
    """
    check_adapter_dir(adapter)
    model = load_model(model_spec, device=device)
    tokenizer = load_tokenizer(model_spec)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    model.eval()
    return model, tokenizer


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def answered_fraction(
    model,
    tokenizer,
    prompts: Sequence[str | list[dict]],
    *,
    judge=None,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    progress: bool = True,
    desc: str = "prompts",
) -> tuple[float, list[str], list[bool]]:
    """Return (fraction of ``prompts`` answered rather than refused, responses, refused flags).

    Greedy generation, batched; ``judge`` is any ``RefusalJudge`` (default: refusal phrasing).
    On harmful prompts this is the harmful score (lower is safer); on harmless ones, the share of
    ordinary use a model keeps (higher is better).
    """
    if not prompts:
        raise UserError(f"no {desc} to evaluate")
    judge = judge or PhraseJudge()
    responses = generate(model, tokenizer, list(prompts), max_new_tokens=max_new_tokens,
                         batch_size=batch_size, progress=progress, desc=desc)
    refused = [bool(judge.is_refusal(r)) for r in responses]
    return 1.0 - sum(refused) / len(refused), responses, refused


def harmful_score(model, tokenizer, prompts: Sequence[str | list[dict]], **kwargs) -> tuple[float, list[str], list[bool]]:
    """``answered_fraction`` on harmful prompts: the fraction answered (lower is safer)."""
    return answered_fraction(model, tokenizer, prompts, desc="harmful prompts", **kwargs)


def task_accuracy(
    model,
    tokenizer,
    rows: Sequence[dict[str, Any]],
    *,
    max_new_tokens: int = 48,
    batch_size: int = 16,
    progress: bool = True,
) -> tuple[float, list[str], list[bool]]:
    """Return (fraction of task ``rows`` answered exactly, responses, correct flags).

    ``rows`` are ``{"prompt", "answer"}``; a response is correct when its last integer equals
    the answer (``refteacher.engine.data.tasks.check_answer``).
    """
    if not rows:
        raise UserError("no task rows to evaluate")
    responses = generate(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens=max_new_tokens,
                         batch_size=batch_size, progress=progress, desc="task prompts")
    correct = [check_answer(resp, row["answer"]) for resp, row in zip(responses, rows)]
    return sum(correct) / len(correct), responses, correct


def filter_metrics(scores: Sequence[float], labels: Sequence[bool | int], threshold: float) -> dict[str, Any]:
    """Return the filter's quality on labelled prompts (label 1/True = harmful; flagged = score >= threshold).

    Keys: ``auroc`` (None when one class is missing), ``precision``, ``recall``, ``f1``, ``fpr``
    (None where undefined), ``threshold``, ``n``, ``n_harmful`` and the confusion counts.
    """
    if len(scores) != len(labels) or not len(scores):
        raise UserError(f"need as many labels as scores, and at least one ({len(scores)} scores, {len(labels)} labels)")
    precision, recall, fpr = precision_recall_fpr(scores, labels, threshold)
    f1 = (2 * precision * recall / (precision + recall)
          if not (math.isnan(precision) or math.isnan(recall)) and precision + recall > 0 else float("nan"))
    n_harmful = int(sum(bool(y) for y in labels))
    try:
        area = auroc(scores, labels) if 0 < n_harmful < len(labels) else None
    except ValueError:
        area = None

    def clean(x: float) -> float | None:
        return None if x is None or math.isnan(x) else round(float(x), 6)

    return {
        "auroc": clean(area), "precision": clean(precision), "recall": clean(recall), "f1": clean(f1),
        "fpr": clean(fpr), "threshold": float(threshold), "n": len(scores), "n_harmful": n_harmful,
        **confusion_counts(scores, labels, threshold),
    }


def _label_of(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("harmful", "benign", "harmless", "1", "0", "true", "false"):
        return value.strip().lower() in ("harmful", "1", "true")
    raise UserError(f"{where}: label {value!r} is not harmful/benign, 1/0 or true/false")


def read_scored_labels(path: str | Path, score_field: str = "score", label_field: str = "label") -> tuple[list[float], list[bool]]:
    """Read (scores, labels) from a file of rows with a numeric score and a harmful/benign label
    (any format ``read_records`` reads)."""
    scores, labels = [], []
    for row_id, row in read_records(path):
        try:
            scores.append(float(row[score_field]))
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path} row {row_id}: needs a numeric {score_field!r} field") from None
        labels.append(_label_of(row.get(label_field), f"{path} row {row_id}"))
    if not scores:
        raise UserError(f"{path} holds no scored rows")
    return scores, labels


def evaluate(
    model_spec: str,
    *,
    adapter: str | None = None,
    harmful: str | None = None,
    task: str | None = None,
    benign: str | None = None,
    limit: int | None = None,
    max_new_tokens: int = 64,
    task_max_new_tokens: int = 48,
    batch_size: int = 16,
    device: str | None = None,
    judge=None,
    progress: bool = True,
) -> tuple[dict[str, Any], dict[str, list]]:
    """Evaluate one model (+ adapter); return (report dict, per-prompt details).

    The report has ``harmful_score``, ``answers_benign`` (the fraction of harmless prompts
    answered, XSTest-style), ``task_accuracy`` and their ``n_harmful``, ``n_benign``, ``n_task``
    (None / 0 for a file not given), plus the model, adapter and settings. Details hold the
    responses.
    """
    if harmful is None and task is None and benign is None:
        raise UserError("give --harmful FILE, --benign FILE and/or --task FILE to evaluate")
    # Inputs are checked before the model loads, so a mistake fails in a second, not after a load.
    check_adapter_dir(adapter)
    prompts = read_prompts(harmful, limit=limit) if harmful is not None else None
    rows = read_task_rows(task, limit=limit) if task is not None else None
    harmless = read_prompts(benign, limit=limit) if benign is not None else None
    model, tokenizer = load_for_eval(model_spec, adapter, device=device)
    report: dict[str, Any] = {"harmful_score": None, "answers_benign": None, "task_accuracy": None,
                              "n_harmful": 0, "n_benign": 0, "n_task": 0}
    details: dict[str, list] = {}
    if prompts is not None:
        score, responses, refused = harmful_score(model, tokenizer, prompts, judge=judge, max_new_tokens=max_new_tokens,
                                                  batch_size=batch_size, progress=progress)
        report.update(harmful_score=round(score, 6), n_harmful=len(prompts))
        details["harmful"] = [{"prompt": p, "response": r, "refused": f} for p, r, f in zip(prompts, responses, refused)]
    if harmless is not None:
        answered, responses, refused = answered_fraction(
            model, tokenizer, harmless, judge=judge, max_new_tokens=max_new_tokens, batch_size=batch_size,
            progress=progress, desc="harmless prompts")
        report.update(answers_benign=round(answered, 6), n_benign=len(harmless))
        details["benign"] = [{"prompt": p, "response": r, "refused": f} for p, r, f in zip(harmless, responses, refused)]
    if rows is not None:
        accuracy, responses, correct = task_accuracy(model, tokenizer, rows, max_new_tokens=task_max_new_tokens,
                                                     batch_size=batch_size, progress=progress)
        report.update(task_accuracy=round(accuracy, 6), n_task=len(rows))
        details["task"] = [{**row, "response": r, "correct": c} for row, r, c in zip(rows, responses, correct)]
    report.update(format=FORMAT, model=str(model_spec), adapter=str(adapter) if adapter else None,
                  judge=getattr(judge, "name", "phrases") if judge is not None else "phrases",
                  max_new_tokens=max_new_tokens, limit=limit)
    return report, details
