"""Choosing the filter threshold from held-out scores, and the figures reported with it."""
from __future__ import annotations

from typing import Any

import torch

from refteacher.engine.errors import UserError
from refteacher.engine.metrics import auroc, precision_recall_fpr, threshold_for_fpr, threshold_for_recall
from refteacher.engine.teacher.config import DEFAULT_TARGET_FPR

# ----------------------------------------------------------------------------- calibration


def calibrate(harmful_scores, harmless_scores, *, target_recall: float | None = None,
              target_fpr: float | None = None, floor: float | None = None) -> tuple[float, dict[str, Any]]:
    """Choose the flagging threshold from calibration scores; return (threshold, figures).

    With ``target_recall``: the highest threshold with recall >= ``target_recall`` on the harmful
    scores. Otherwise: the lowest threshold with false-positive rate <= ``target_fpr`` (default
    ``DEFAULT_TARGET_FPR``) on the harmless ones -- the default, because harmful calibration
    prompts share the training sets' sources and score higher than unseen harmful prompts, while
    the harmless side of the threshold carries over (see benchmarks/eval_teacher.py). ``floor``,
    when given, is the lowest threshold allowed (the rule's choice is raised to it). Figures:
    rule, target, floor, AUROC, recall, FPR, precision and counts at the threshold.
    """
    harmful = torch.as_tensor(harmful_scores, dtype=torch.float64).reshape(-1)
    harmless = torch.as_tensor(harmless_scores, dtype=torch.float64).reshape(-1)
    if harmful.numel() == 0 or harmless.numel() == 0:
        raise UserError("calibration needs harmful and harmless prompts; give more data or a larger --calib-fraction")
    scores = torch.cat([harmful, harmless])
    labels = torch.cat([torch.ones_like(harmful), torch.zeros_like(harmless)]).bool()
    if target_recall is not None:
        threshold = threshold_for_recall(scores, labels, target_recall)
        rule = {"rule": "recall", "target_recall": target_recall}
    else:
        target_fpr = DEFAULT_TARGET_FPR if target_fpr is None else target_fpr
        threshold = threshold_for_fpr(scores, labels, target_fpr)
        rule = {"rule": "fpr", "target_fpr": target_fpr}
    if floor is not None:
        rule["floor"] = float(floor)
        threshold = max(float(threshold), float(floor))
    precision, recall, fpr = precision_recall_fpr(scores, labels, threshold)
    figures = {**rule, "threshold": threshold, "auroc": auroc(scores, labels), "recall": recall, "fpr": fpr,
               "precision": precision, "harmful": int(harmful.numel()), "harmless": int(harmless.numel())}
    return float(threshold), figures
