"""Triton kernel for the per-row divergence between two rows of logits and its gradient.

One program handles one row of a chunk: it walks the vocabulary in blocks with an online
softmax (fp32, on the raw logits divided by the temperature), then computes the divergence and,
when asked, overwrites the student logits in place with the gradient of
``grad_scale[row] * loss[row]`` with respect to the raw student logits. No extra [rows, V]
buffer is allocated. Passes over the vocabulary per row:

- pass 1: running max and sum of exponentials for student and teacher (both log-normalisers);
- pass 2: the divergence (and, for ``forward``, the gradient ``q - p``, which needs no more);
- pass 3 (``reverse`` and ``jsd`` with a gradient only): the gradient, which needs pass 2's sum.

Every elementwise term is guarded with ``where(prob > 0, ...)`` so padded lanes (loaded as
-inf) and probabilities that underflow to 0 contribute 0, never ``0 * -inf = NaN``.
"""
from __future__ import annotations

import math

import torch

from refteacher.kernels.dispatch import triton_interpreting

try:  # triton is optional; kernels/kl.py only calls this module when it imports
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

DIRECTION_CODES = {"forward": 0, "reverse": 1, "jsd": 2}
# Vocabulary block per loop step. The interpreter pays per step, so it gets a larger block.
_BLOCK_V_GPU = 4096
_BLOCK_V_INTERPRETER = 8192


def _kl_rows_kernel(
    zs_ptr, zt_ptr, loss_ptr, grad_scale_ptr,
    n_cols, stride_s, stride_t,
    inv_temperature, temperature_sq, beta, log_beta, log_one_minus_beta,
    DIRECTION: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Row ``program_id(0)``: loss[row] = T^2 * D(row); if WRITE_GRAD, zs[row] <- dLoss/dzs."""
    row = tl.program_id(0).to(tl.int64)
    s_row = zs_ptr + row * stride_s
    t_row = zt_ptr + row * stride_t
    offsets = tl.arange(0, BLOCK_V)

    # pass 1: log-normalisers of student (s) and teacher (t), online over the vocabulary
    max_s = float("-inf")
    sum_s = 0.0
    max_t = float("-inf")
    sum_t = 0.0
    for start in range(0, n_cols, BLOCK_V):
        cols = start + offsets
        valid = cols < n_cols
        s = tl.load(s_row + cols, mask=valid, other=float("-inf")).to(tl.float32) * inv_temperature
        t = tl.load(t_row + cols, mask=valid, other=float("-inf")).to(tl.float32) * inv_temperature
        new_max_s = tl.maximum(max_s, tl.max(s, 0))
        new_max_t = tl.maximum(max_t, tl.max(t, 0))
        sum_s = sum_s * tl.exp(max_s - new_max_s) + tl.sum(tl.exp(s - new_max_s), 0)
        sum_t = sum_t * tl.exp(max_t - new_max_t) + tl.sum(tl.exp(t - new_max_t), 0)
        max_s = new_max_s
        max_t = new_max_t
    lse_s = max_s + tl.log(sum_s)
    lse_t = max_t + tl.log(sum_t)
    grad_scale = 0.0
    if WRITE_GRAD:
        grad_scale = tl.load(grad_scale_ptr + row).to(tl.float32) * temperature_sq * inv_temperature

    # pass 2: the divergence (forward KL also writes its gradient here)
    div_main = 0.0  # forward: KL(p||q); reverse: KL(q||p); jsd: KL(q||m)
    div_other = 0.0  # jsd only: KL(p||m)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + offsets
        valid = cols < n_cols
        s = tl.load(s_row + cols, mask=valid, other=float("-inf")).to(tl.float32) * inv_temperature
        t = tl.load(t_row + cols, mask=valid, other=float("-inf")).to(tl.float32) * inv_temperature
        log_q = s - lse_s
        log_p = t - lse_t
        q = tl.exp(log_q)
        p = tl.exp(log_p)
        if DIRECTION == 0:
            div_main += tl.sum(tl.where(p > 0, p * (log_p - log_q), 0.0), 0)
            if WRITE_GRAD:
                tl.store(s_row + cols, grad_scale * (q - p), mask=valid)
        elif DIRECTION == 1:
            div_main += tl.sum(tl.where(q > 0, q * (log_q - log_p), 0.0), 0)
        else:
            a = log_p + log_beta
            b = log_q + log_one_minus_beta
            hi = tl.maximum(a, b)
            log_m = hi + tl.log(tl.exp(a - hi) + tl.exp(b - hi))
            div_main += tl.sum(tl.where(q > 0, q * (log_q - log_m), 0.0), 0)
            div_other += tl.sum(tl.where(p > 0, p * (log_p - log_m), 0.0), 0)

    if DIRECTION == 2:
        loss = beta * div_other + (1.0 - beta) * div_main
    else:
        loss = div_main
    tl.store(loss_ptr + row, loss * temperature_sq)

    # pass 3: gradients that need the whole row's divergence first
    if WRITE_GRAD:
        if DIRECTION != 0:
            for start in range(0, n_cols, BLOCK_V):
                cols = start + offsets
                valid = cols < n_cols
                s = tl.load(s_row + cols, mask=valid, other=float("-inf")).to(tl.float32)
                s = s * inv_temperature
                t = tl.load(t_row + cols, mask=valid, other=float("-inf")).to(tl.float32)
                t = t * inv_temperature
                log_q = s - lse_s
                log_p = t - lse_t
                q = tl.exp(log_q)
                if DIRECTION == 1:
                    grad = tl.where(q > 0, q * (log_q - log_p - div_main), 0.0)
                else:
                    a = log_p + log_beta
                    b = log_q + log_one_minus_beta
                    hi = tl.maximum(a, b)
                    log_m = hi + tl.log(tl.exp(a - hi) + tl.exp(b - hi))
                    grad = (1.0 - beta) * tl.where(q > 0, q * (log_q - log_m - div_main), 0.0)
                tl.store(s_row + cols, grad_scale * grad, mask=valid)


_JIT_KERNELS: dict[bool, object] = {}


def _jit_kernel():
    """The kernel jitted for the current ``TRITON_INTERPRET`` setting (cached per setting)."""
    mode = triton_interpreting()
    if mode not in _JIT_KERNELS:
        _JIT_KERNELS[mode] = triton.jit(_kl_rows_kernel)
    return _JIT_KERNELS[mode]


def triton_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    grad_scale: torch.Tensor | None,
    *,
    temperature: float,
    direction: str,
    beta: float,
) -> torch.Tensor:
    """Per-row divergence of float32 logits [C, V]; returns the float32 losses [C] (times T^2).

    When ``grad_scale`` ([C] float32) is given, ``student_logits`` is overwritten in place with
    the gradient of ``sum(grad_scale * loss)`` with respect to the (un-tempered) student logits.
    Both logits tensors must be float32 with unit stride along the vocabulary.
    """
    rows, n_cols = student_logits.shape
    losses = torch.empty(rows, dtype=torch.float32, device=student_logits.device)
    if rows == 0:
        return losses
    block_v = _BLOCK_V_INTERPRETER if triton_interpreting() else _BLOCK_V_GPU
    block_v = min(block_v, triton.next_power_of_2(n_cols))
    beta_f = float(beta) if direction == "jsd" else 0.5
    write_grad = grad_scale is not None
    _jit_kernel()[(rows,)](
        student_logits, teacher_logits, losses, grad_scale if write_grad else losses,
        n_cols, student_logits.stride(0), teacher_logits.stride(0),
        1.0 / float(temperature), float(temperature) ** 2,
        beta_f, math.log(beta_f), math.log1p(-beta_f),
        DIRECTION=DIRECTION_CODES[direction], WRITE_GRAD=write_grad, BLOCK_V=block_v,
        num_warps=8 if block_v >= 4096 else 4,
    )
    return losses
