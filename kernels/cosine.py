"""Refusal scoring: cosine similarity of hidden states with one or more refusal features.

``refusal_scores(hidden, feature, positions=None, eps=1e-8, backend=None)`` is the public call.

Semantics (shared by all three implementations)::

    score[n, k] = <x_n, f_k> / (max(|x_n|, eps) * max(|f_k|, eps))

computed in float32 (float64 when the inputs are float64, so that ``gradcheck`` works), where
``x_n`` is row ``n`` of ``hidden`` [N, H], or, for ``hidden`` [B, T, H], the token
``positions[b]`` of sequence ``b``. A zero row or a zero feature therefore scores 0, never NaN.
Positions may be negative, Python style (``-1`` is the last token, handy for left-padded
batches); anything outside ``[-T, T)`` raises ``ValueError``.

Implementations, picked by ``refteacher.kernels.dispatch.select_backend``
(``REFTEACHER_KERNEL_BACKEND`` or the ``backend`` argument):

- ``triton``: one pass over the selected rows; each program loads a block of rows once, fuses
  the sum of squares and the K dot products, and gathers ``[B, T, H]`` rows through the strides
  (no ``[B, H]`` copy, any strides). The features are normalised once on the host side (a tiny
  [K, H] float32 tensor). Forward only: when autograd needs a gradient (grad mode on and
  ``hidden`` or ``feature`` requires grad), or for float64 inputs, the call runs the torch path.
- ``torch`` (the CPU default): the same math in row chunks of bounded size (the float32 upcast of
  a bf16 input is 4 MiB at a time on CPU, 64 MiB on CUDA), differentiable with respect to
  ``hidden`` and ``feature`` (autograd keeps each chunk's rows for the backward, as usual).
- ``reference``: ``refusal_scores_reference``, the naive twin (gather, upcast everything,
  ``F.cosine_similarity``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from refteacher.kernels.dispatch import select_backend, triton_interpreting

try:  # triton is optional (absent on some platforms); the torch paths never need it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Rows per torch-path chunk are chosen so that a chunk holds about this many elements:
# on CPU 1M float32 (4 MiB: mostly cache-resident between the upcast, the norm and the dot;
# smaller chunks were ~10% faster on one idle thread but far slower when OpenMP threads compete
# for cores, each small op paying a barrier), on CUDA 16M (64 MiB; fewer launches).
_TORCH_CHUNK_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 24}
# Features handled by one Triton program; more features add programs along grid axis 1
# (each group re-reads its rows, so one pass over ``hidden`` holds for K <= this).
_TRITON_FEATURES_PER_PROGRAM = 8


# ----------------------------------------------------------------------------- validation


def _check_inputs(
    hidden: torch.Tensor, feature: torch.Tensor, positions: torch.Tensor | None
) -> None:
    """Raise ValueError, saying how to fix it, for any shape, dtype or device mismatch."""
    for name, t in (("hidden", hidden), ("feature", feature)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(
                f"{name} has dtype {t.dtype}; use float32, bfloat16 or float16 (float64 for tests)"
            )
    if feature.dtype not in (hidden.dtype, torch.float32):
        raise ValueError(
            f"feature dtype {feature.dtype} does not match hidden dtype {hidden.dtype}; "
            "pass the feature in hidden's dtype or in float32"
        )
    if feature.device != hidden.device:
        raise ValueError(
            f"feature is on {feature.device} but hidden is on {hidden.device}; "
            "move both to the same device"
        )
    if feature.dim() not in (1, 2):
        raise ValueError(f"feature must be [H] or [K, H], got shape {tuple(feature.shape)}")
    if hidden.shape[-1:] != feature.shape[-1:] or hidden.dim() == 0:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} and feature {tuple(feature.shape)} must share the "
            "last (hidden-size) dimension"
        )
    if hidden.dim() == 2:
        if positions is not None:
            raise ValueError(
                "positions is only for hidden of shape [B, T, H]; hidden is [N, H] already, "
                "pass positions=None"
            )
        return
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [N, H] or [B, T, H], got shape {tuple(hidden.shape)}")
    if positions is None:
        raise ValueError(
            "hidden is [B, T, H]: pass positions [B] (the index of each row's last prompt token)"
        )
    if not isinstance(positions, torch.Tensor):
        raise ValueError(f"positions must be a torch.Tensor, got {type(positions).__name__}")
    if positions.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"positions must be int64 or int32, got {positions.dtype}")
    if positions.shape != hidden.shape[:1]:
        raise ValueError(
            f"positions has shape {tuple(positions.shape)} but hidden has B={hidden.shape[0]} "
            "rows; pass one position per row"
        )
    if positions.device != hidden.device:
        raise ValueError(
            f"positions is on {positions.device} but hidden is on {hidden.device}; "
            "move both to the same device"
        )
    seq_len = hidden.shape[1]
    if positions.numel():
        low, high = (int(v) for v in torch.stack(torch.aminmax(positions)).tolist())
        if low < -seq_len or high >= seq_len:
            bad = low if low < -seq_len else high
            raise ValueError(
                f"position {bad} is outside [-{seq_len}, {seq_len}) for hidden with "
                f"T={seq_len} tokens"
            )


def _accumulate_dtype(hidden: torch.Tensor) -> torch.dtype:
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


def _num_rows(hidden: torch.Tensor) -> int:
    return hidden.shape[0]


def _shape_result(scores: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [N] when a single feature [H] was given."""
    return scores[:, 0] if feature.dim() == 1 else scores


def _gather_rows(
    hidden: torch.Tensor, positions: torch.Tensor | None, start: int, stop: int
) -> torch.Tensor:
    """Rows ``start:stop`` of the selected [N, H] matrix (a view for 2-D ``hidden``)."""
    if positions is None:
        return hidden[start:stop]
    pos = positions[start:stop].long()
    pos = torch.where(pos < 0, pos + hidden.shape[1], pos)
    rows = torch.arange(start, stop, device=hidden.device)
    return hidden[rows, pos]


def _normalised_features(feature: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """Return ``feature`` as [K, H] in ``dtype``, each row divided by max(|f_k|, eps)."""
    f = feature.reshape(-1, feature.shape[-1]).to(dtype)
    return f / torch.linalg.vector_norm(f, dim=-1, keepdim=True).clamp_min(eps)


# ----------------------------------------------------------------------------- reference twin


def refusal_scores_reference(
    hidden: torch.Tensor,
    feature: torch.Tensor,
    positions: torch.Tensor | None = None,
    eps: float = 1e-8,
    backend: str | None = None,
) -> torch.Tensor:
    """Naive twin of ``refusal_scores``: gather the rows, upcast all, ``F.cosine_similarity``.

    Same arguments and result as ``refusal_scores`` ([N] or [N, K] float32); ``backend`` is
    accepted for signature parity and ignored. Materialises the gathered [N, H] rows in float32.
    """
    del backend
    _check_inputs(hidden, feature, positions)
    dtype = _accumulate_dtype(hidden)
    rows = _gather_rows(hidden, positions, 0, _num_rows(hidden)).to(dtype)
    features = feature.reshape(-1, feature.shape[-1]).to(dtype)
    scores = F.cosine_similarity(rows[:, None, :], features[None, :, :], dim=-1, eps=eps)
    return _shape_result(scores, feature)


# ----------------------------------------------------------------------------- torch path


def _torch_scores(
    hidden: torch.Tensor, feature: torch.Tensor, positions: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """Chunked PyTorch scores [N, K] (differentiable); see the module docstring."""
    dtype = _accumulate_dtype(hidden)
    features = _normalised_features(feature, eps, dtype)
    n_rows, hidden_size = _num_rows(hidden), hidden.shape[-1]
    budget = _TORCH_CHUNK_ELEMENTS.get(hidden.device.type, _TORCH_CHUNK_ELEMENTS["cuda"])
    chunk = max(1, budget // max(1, hidden_size))
    parts = []
    for start in range(0, n_rows, chunk):
        rows = _gather_rows(hidden, positions, start, min(n_rows, start + chunk)).to(dtype)
        norms = torch.linalg.vector_norm(rows, dim=-1, keepdim=True).clamp_min(eps)
        parts.append((rows @ features.T) / norms)
    return torch.cat(parts) if len(parts) != 1 else parts[0]


# ----------------------------------------------------------------------------- triton path


def _cosine_rows_kernel(
    hidden_ptr, positions_ptr, features_ptr, out_ptr,
    n_rows, hidden_size, seq_len, n_features,
    stride_row, stride_token, stride_hidden, stride_feature, stride_out,
    eps,
    HAS_POSITIONS: tl.constexpr,
    FEATURES: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Scores for BLOCK_N rows x FEATURES features; ``features_ptr`` rows are pre-normalised."""
    pid_n = tl.program_id(0)
    first_feature = tl.program_id(1) * FEATURES
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    offsets = rows.to(tl.int64) * stride_row
    if HAS_POSITIONS:
        pos = tl.load(positions_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        pos = tl.where(pos < 0, pos + seq_len, pos)
        offsets += pos * stride_token
    slots = tl.arange(0, FEATURES)
    sum_sq = tl.zeros([BLOCK_N], dtype=tl.float32)
    dots = tl.zeros([BLOCK_N, FEATURES], dtype=tl.float32)
    for h_start in range(0, hidden_size, BLOCK_H):
        cols = h_start + tl.arange(0, BLOCK_H)
        col_ok = cols < hidden_size
        x = tl.load(
            hidden_ptr + offsets[:, None] + cols[None, :].to(tl.int64) * stride_hidden,
            mask=row_ok[:, None] & col_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        sum_sq += tl.sum(x * x, axis=1)
        for slot in tl.static_range(FEATURES):
            # padded slots re-read the last feature; their results are never stored
            k = tl.minimum(first_feature + slot, n_features - 1)
            f = tl.load(features_ptr + k * stride_feature + cols, mask=col_ok, other=0.0)
            dot = tl.sum(x * f[None, :], axis=1)
            dots += tl.where(slots[None, :] == slot, dot[:, None], 0.0)
    norms = tl.maximum(tl.sqrt(sum_sq), eps)
    result = dots / norms[:, None]
    features = first_feature + slots
    tl.store(
        out_ptr + rows.to(tl.int64)[:, None] * stride_out + features[None, :],
        result,
        mask=row_ok[:, None] & (features[None, :] < n_features),
    )


_JIT_KERNELS: dict[bool, object] = {}


def _jit_kernel():
    """The kernel compiled for the current mode: decorated lazily, once per TRITON_INTERPRET
    setting, so a test may switch the interpreter on after this module was imported."""
    mode = triton_interpreting()
    if mode not in _JIT_KERNELS:
        _JIT_KERNELS[mode] = triton.jit(_cosine_rows_kernel)
    return _JIT_KERNELS[mode]


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _block_sizes(n_rows: int, hidden_size: int, n_features: int) -> tuple[int, int, int, int]:
    """Return (BLOCK_N, BLOCK_H, FEATURES per program, num_warps) for a launch."""
    features = min(_next_pow2(n_features), _TRITON_FEATURES_PER_PROGRAM)
    if triton_interpreting():  # ~ms per program per loop step: few programs, big blocks
        block_h = min(_next_pow2(hidden_size), 256)
        return min(_next_pow2(n_rows), 64), block_h, features, 1
    block_h = min(_next_pow2(hidden_size), 1024)
    block_n = max(1, min(_next_pow2(n_rows), 4096 // block_h))
    return block_n, block_h, features, 4


def _triton_scores(
    hidden: torch.Tensor, feature: torch.Tensor, positions: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """Triton scores [N, K] float32 (forward only); inputs already validated."""
    features = _normalised_features(feature, eps, torch.float32).contiguous()
    n_rows, hidden_size = _num_rows(hidden), hidden.shape[-1]
    n_features = features.shape[0]
    out = torch.empty((n_rows, n_features), dtype=torch.float32, device=hidden.device)
    block_n, block_h, per_program, num_warps = _block_sizes(n_rows, hidden_size, n_features)
    if hidden.dim() == 3:
        stride_row, stride_token, stride_hidden = hidden.stride()
        seq_len = hidden.shape[1]
        pos_arg = positions.contiguous()
    else:
        (stride_row, stride_hidden), stride_token, seq_len = hidden.stride(), 0, 1
        pos_arg = out  # never read (HAS_POSITIONS is False); any pointer will do
    grid = (triton.cdiv(n_rows, block_n), triton.cdiv(n_features, per_program))
    _jit_kernel()[grid](
        hidden, pos_arg, features, out,
        n_rows, hidden_size, seq_len, n_features,
        stride_row, stride_token, stride_hidden, features.stride(0), out.stride(0),
        eps,
        HAS_POSITIONS=positions is not None,
        FEATURES=per_program,
        BLOCK_N=block_n,
        BLOCK_H=block_h,
        num_warps=num_warps,
    )
    return out


# ----------------------------------------------------------------------------- public entry


def refusal_scores(
    hidden: torch.Tensor,
    feature: torch.Tensor,
    positions: torch.Tensor | None = None,
    eps: float = 1e-8,
    backend: str | None = None,
) -> torch.Tensor:
    """Cosine similarity of hidden states with refusal feature(s), fp32-accumulated.

    Args:
        hidden: [N, H], or [B, T, H] together with ``positions``; float32, bfloat16 or float16
            (float64 is accepted for gradient checks and is computed in float64).
        feature: [H] or [K, H]; hidden's dtype or float32, same device as ``hidden``.
        positions: [B] int64/int32 token index per row for 3-D ``hidden``; negative values count
            from the end (Python style); outside [-T, T) raises ValueError.
        eps: lower bound on each norm; a zero row or zero feature scores 0.
        backend: "auto" | "triton" | "torch" | "reference"; None reads REFTEACHER_KERNEL_BACKEND.

    Returns:
        float32 scores [N] (feature [H]) or [N, K] (feature [K, H]), on hidden's device.
        Differentiable w.r.t. ``hidden`` and ``feature`` (the Triton path hands gradient-needing
        calls to the torch path). Raises ValueError on mismatched shapes, dtypes or devices.
    """
    _check_inputs(hidden, feature, positions)
    choice = select_backend(hidden, feature, positions, backend=backend)
    if choice == "reference":
        return refusal_scores_reference(hidden, feature, positions, eps)
    n_features = 1 if feature.dim() == 1 else feature.shape[0]
    if _num_rows(hidden) == 0 or n_features == 0 or hidden.shape[-1] == 0:
        empty = torch.zeros(
            (_num_rows(hidden), n_features), dtype=_accumulate_dtype(hidden), device=hidden.device
        )
        grad_anchor = hidden.sum() * 0 + feature.sum() * 0  # keeps autograd connected
        return _shape_result(empty + grad_anchor.to(empty.dtype), feature)
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or feature.requires_grad)
    if choice == "triton" and not needs_grad and hidden.dtype in _TRITON_DTYPES:
        scores = _triton_scores(hidden, feature, positions, eps)
    else:
        scores = _torch_scores(hidden, feature, positions, eps)
    return _shape_result(scores, feature)
