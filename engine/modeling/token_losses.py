"""Next-token losses computed from hidden states, only where labels are, without full logits.

Labels follow the Hugging Face convention (unshifted, -100 = no loss): the hidden state at
position t predicts ``labels[t + 1]``. ``shifted_targets`` picks those positions once; the
cross-entropy then multiplies only the selected hidden states by the LM head, a chunk at a time,
recomputing each chunk's logits in the backward pass, so memory holds one chunk of logits
([chunk, V]) instead of [tokens, V]. A chunk holds as many tokens as keep a [chunk, V] float32
buffer within the fused KL's per-device budget (``kernels.kl.default_chunk_size``: 64 MiB on CPU,
256 MiB on CUDA), so a large vocabulary gets fewer tokens per chunk.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from refteacher.engine.data.chat_examples import IGNORE_INDEX
from refteacher.kernels.kl import default_chunk_size


def shifted_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (mask [R, L] bool, targets [N] long) for next-token prediction.

    ``labels`` [R, L] long, unshifted. ``mask[r, t]`` is True when the hidden state at (r, t) has a
    target, i.e. ``labels[r, t + 1] != -100``; the last column is always False. ``targets`` are
    those labels in row-major order (N = mask.sum()).
    """
    if labels.dim() != 2:
        raise ValueError(f"labels must be [R, L], got shape {tuple(labels.shape)}")
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask, labels[:, 1:][mask[:, :-1]]


def _chunk_ce_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias).float()
    return F.cross_entropy(logits, targets, reduction="sum")


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Return the mean cross-entropy of ``hidden @ weight.T (+ bias)`` against ``targets``.

    ``hidden`` [N, H] (any float dtype; logits are taken in float32), ``weight`` [V, H],
    ``targets`` [N] long. Computed ``chunk_size`` rows at a time (default: the device's budget, see
    the module doc) with activation checkpointing, so at most [chunk_size, V] logits exist at
    once, forward and backward. Returns a float32 scalar
    (0 with a zero gradient when N == 0).
    """
    if hidden.shape[0] != targets.shape[0]:
        raise ValueError(f"hidden has {hidden.shape[0]} rows but targets {targets.shape[0]}")
    n = hidden.shape[0]
    if n == 0:
        return hidden.sum().float() * 0.0
    chunk_size = max(1, int(chunk_size or default_chunk_size(weight.shape[0], hidden.device)))
    total = hidden.new_zeros((), dtype=torch.float32)
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    for start in range(0, n, chunk_size):
        h = hidden[start : start + chunk_size]
        y = targets[start : start + chunk_size]
        if needs_grad:
            total = total + checkpoint(_chunk_ce_sum, h, weight, bias, y, use_reentrant=False)
        else:
            total = total + _chunk_ce_sum(h, weight, bias, y)
    return total / n
