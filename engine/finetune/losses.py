"""The finetune's two losses from hidden states: task CE on packed rows and KL to the teacher."""
from __future__ import annotations

import torch

from refteacher.engine.modeling.forward import final_hidden_states, lm_head_of
from refteacher.engine.modeling.token_losses import linear_cross_entropy, shifted_targets
from refteacher.kernels.kl import fused_linear_kl

# --------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------


def task_cross_entropy(model, batch: dict[str, torch.Tensor], *, chunk_size: int | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy of ``model`` over the labelled tokens of packed task rows.

    ``batch`` holds ``input_ids``, ``labels``, ``position_ids`` ([R, L] long). Returns a float32
    scalar; no [tokens, V] logits are built.
    """
    hidden = final_hidden_states(model, batch["input_ids"], batch["position_ids"])
    mask, targets = shifted_targets(batch["labels"])
    weight, bias = lm_head_of(model)
    return linear_cross_entropy(hidden[mask], weight, targets, bias=bias, chunk_size=chunk_size)


def alignment_kl(
    student,
    teacher,
    batch: dict[str, torch.Tensor],
    *,
    temperature: float = 1.0,
    direction: str = "forward",
    beta: float = 0.5,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """KL between teacher and student next-token distributions on the response tokens of alignment rows.

    ``batch`` holds ``align_input_ids``, ``align_labels``, ``align_position_ids`` ([R, L] long).
    The teacher runs without gradient. Returns the float32 mean over response tokens of
    ``T**2 * D`` (D = KL(teacher||student) for "forward"; see ``fused_linear_kl``).
    """
    ids, positions = batch["align_input_ids"], batch["align_position_ids"]
    mask, _ = shifted_targets(batch["align_labels"])
    student_hidden = final_hidden_states(student, ids, positions)[mask]
    with torch.no_grad():
        teacher_hidden = final_hidden_states(teacher, ids, positions)[mask]
    student_weight, student_bias = lm_head_of(student)
    teacher_weight, teacher_bias = lm_head_of(teacher)
    teacher_hidden = teacher_hidden.to(student_hidden.dtype)
    return fused_linear_kl(
        student_hidden, student_weight.to(student_hidden.dtype),
        teacher_hidden, teacher_weight.to(student_hidden.dtype),
        temperature=temperature, direction=direction, beta=beta, reduction="mean",
        chunk_size=chunk_size, student_bias=student_bias, teacher_bias=teacher_bias,
    )
