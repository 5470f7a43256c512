"""Distillation divergences between student and teacher next-token distributions.

Public calls:

- ``fused_linear_kl(student_hidden, student_weight, teacher_hidden, teacher_weight, *, mask=None,
  temperature=1.0, direction="forward", beta=0.5, reduction="mean", chunk_size=None,
  student_bias=None, teacher_bias=None, backend=None)``: the loss from hidden states and LM-head
  weights, never holding [N, V] logits.
- ``kl_div_logits(student_logits, teacher_logits, *, mask=None, temperature=1.0,
  direction="forward", beta=0.5, reduction="mean", chunk_size=None, backend=None)``: the same
  loss for callers that already hold logits [N, V].
- ``fused_linear_kl_reference`` and ``kl_div_logits_reference``: the naive twins (full logits,
  ``log_softmax``, ``kl_div``) with the same signatures.

Semantics (all implementations). With ``s = student_logits / T`` and ``t = teacher_logits / T``
(float32, or float64 for float64 inputs), ``q = softmax(s)`` and ``p = softmax(t)``, each token's
loss is ``T**2 * D`` where ``D`` is

- ``forward``: KL(p || q), the usual distillation direction;
- ``reverse``: KL(q || p);
- ``jsd``: the generalised Jensen-Shannon divergence
  ``beta * KL(p || m) + (1 - beta) * KL(q || m)`` with ``m = beta * p + (1 - beta) * q``,
  ``0 < beta < 1`` (``beta=0.5`` is the symmetric JSD). ``log m`` is computed in log space, so
  tokens where both probabilities underflow add 0, not NaN.

``mask`` [N] bool picks the tokens that count. ``reduction``: ``"mean"`` over the selected tokens
(0 when none is selected, with zero gradients), ``"sum"``, or ``"none"`` (a [N] float32 vector,
0 at unselected tokens). The teacher never receives a gradient.

Implementations, picked by ``refteacher.kernels.dispatch.select_backend``
(``REFTEACHER_KERNEL_BACKEND`` or the ``backend`` argument):

- ``torch`` (the CPU default) and ``triton`` (the CUDA default) share one chunk loop
  (``_chunk_pass``) over the selected tokens. Per chunk of C tokens it computes both logits
  [C, V] with a matmul whose output is float32 (bf16/fp16 operands are multiplied with a float32
  result on CUDA, or upcast first on CPU: never rounded to bf16), then the divergence and its
  gradient w.r.t. the student logits (in place over them) either with torch ops or with one
  Triton kernel (``kernels/kl_triton.py``), then ``grad_hidden = dlogits @ W`` and, only when the
  weight (bias) requires grad, ``grad_W += dlogits^T @ h`` in float32 (with bf16/fp16 heads on
  CUDA these two take ``dlogits`` rounded to the head's dtype, float32 accumulation and output,
  as mixed-precision autograd would; elsewhere all in float32). With ``"mean"``/``"sum"``
  this all happens in the forward pass and backward only scales by ``grad_output``; with
  ``"none"`` backward reruns the loop weighted by ``grad_output``. Extra memory is O(C x V) plus
  the gradients themselves.
- ``reference``: the naive twin.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from refteacher.kernels.dispatch import select_backend

DIRECTIONS = ("forward", "reverse", "jsd")
REDUCTIONS = ("mean", "sum", "none")
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# Default tokens per chunk: enough that each [C, V] float32 logits buffer holds about this
# many elements (CPU: 16M = 64 MiB; CUDA: 64M = 256 MiB, so the matmuls run at speed).
_CHUNK_ELEMENTS = {"cpu": 1 << 24, "cuda": 1 << 26}


# ----------------------------------------------------------------------------- validation


def _check_options(temperature: float, direction: str, beta: float, reduction: str) -> None:
    """Raise ValueError for an unknown direction/reduction or an out-of-range number."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction={direction!r}; use one of {', '.join(DIRECTIONS)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}; use one of {', '.join(REDUCTIONS)}")
    number = isinstance(temperature, (int, float)) and math.isfinite(temperature)
    if not (number and temperature > 0):
        raise ValueError(f"temperature={temperature!r}; it must be a finite number > 0")
    if direction == "jsd" and not (0.0 < float(beta) < 1.0):
        raise ValueError(
            f"beta={beta!r} with direction='jsd'; it must lie strictly between 0 and 1 "
            "(the divergence is identically 0 at the ends: use 'forward' or 'reverse' instead)"
        )


def _check_tensor(name: str, t: torch.Tensor, dim: int) -> None:
    """Raise ValueError unless ``t`` is a tensor of a supported float dtype with ``dim`` dims."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name} has dtype {t.dtype}; use float32, bfloat16 or float16")
    if t.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimension(s), got shape {tuple(t.shape)}")


def _check_mask(mask: torch.Tensor | None, n_tokens: int, device: torch.device) -> None:
    """Raise ValueError unless ``mask`` is None or a bool [N] tensor on ``device``."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise ValueError("mask must be a bool tensor [N] (True = the token counts)")
    if tuple(mask.shape) != (n_tokens,):
        raise ValueError(
            f"mask has shape {tuple(mask.shape)}; expected ({n_tokens},), one per token"
        )
    if mask.device != device:
        raise ValueError(f"mask is on {mask.device} but the inputs are on {device}; move it there")


def _check_same_device(named: dict[str, torch.Tensor | None]) -> torch.device:
    """Return the common device of the given tensors or raise ValueError naming the odd one."""
    present = {k: v for k, v in named.items() if v is not None}
    first_name, first = next(iter(present.items()))
    for name, t in present.items():
        if t.device != first.device:
            raise ValueError(
                f"{name} is on {t.device} but {first_name} is on {first.device}; "
                "move all inputs to one device"
            )
    return first.device


def _check_linear_inputs(sh, sw, th, tw, sb, tb, mask) -> None:
    """Validate the inputs of ``fused_linear_kl`` (shapes, dtypes, devices); raise ValueError."""
    for name, t in (("student_hidden", sh), ("student_weight", sw),
                    ("teacher_hidden", th), ("teacher_weight", tw)):
        _check_tensor(name, t, 2)
    if sw.shape[0] != tw.shape[0]:
        raise ValueError(
            f"student vocabulary {sw.shape[0]} != teacher vocabulary {tw.shape[0]}: the two LM "
            "heads must share one tokenizer (pad or slice the smaller head to the same rows)"
        )
    if sh.shape[1] != sw.shape[1]:
        raise ValueError(
            f"student_hidden is {tuple(sh.shape)} but student_weight is {tuple(sw.shape)}: "
            "the hidden size (last dim of both) must match"
        )
    if th.shape[1] != tw.shape[1]:
        raise ValueError(
            f"teacher_hidden is {tuple(th.shape)} but teacher_weight is {tuple(tw.shape)}: "
            "the hidden size (last dim of both) must match"
        )
    if sh.shape[0] != th.shape[0]:
        raise ValueError(
            f"student_hidden has {sh.shape[0]} tokens but teacher_hidden has {th.shape[0]}; "
            "pass the same tokens, in the same order, to both"
        )
    for side, hidden, weight, bias in (("student", sh, sw, sb), ("teacher", th, tw, tb)):
        if hidden.dtype != weight.dtype:
            raise ValueError(
                f"{side}_hidden is {hidden.dtype} but {side}_weight is {weight.dtype}; "
                "cast one so they match"
            )
        if bias is not None:
            _check_tensor(f"{side}_bias", bias, 1)
            if bias.shape[0] != weight.shape[0] or bias.dtype != weight.dtype:
                raise ValueError(
                    f"{side}_bias must be [{weight.shape[0]}] in {weight.dtype}, got "
                    f"{tuple(bias.shape)} in {bias.dtype}"
                )
    device = _check_same_device({
        "student_hidden": sh, "student_weight": sw, "teacher_hidden": th, "teacher_weight": tw,
        "student_bias": sb, "teacher_bias": tb,
    })
    _check_mask(mask, sh.shape[0], device)


def _check_logits_inputs(student_logits, teacher_logits, mask) -> None:
    """Validate the inputs of ``kl_div_logits``; raise ValueError."""
    _check_tensor("student_logits", student_logits, 2)
    _check_tensor("teacher_logits", teacher_logits, 2)
    if student_logits.shape[1] != teacher_logits.shape[1]:
        raise ValueError(
            f"student vocabulary {student_logits.shape[1]} != teacher vocabulary "
            f"{teacher_logits.shape[1]}: both must score the same tokenizer's vocabulary"
        )
    if student_logits.shape[0] != teacher_logits.shape[0]:
        raise ValueError(
            f"student_logits has {student_logits.shape[0]} tokens but teacher_logits has "
            f"{teacher_logits.shape[0]}; pass the same tokens to both"
        )
    device = _check_same_device(
        {"student_logits": student_logits, "teacher_logits": teacher_logits}
    )
    _check_mask(mask, student_logits.shape[0], device)


def _accumulate_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64 (for gradcheck), else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


# ----------------------------------------------------------------------------- divergence math


def _log_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``log_softmax(logits / temperature)`` of [C, V] logits (a new buffer; the division is done
    in place on ``logits``). torch's fused log_softmax kernel is ~1.5x faster on CPU than an
    in-place max/logsumexp/subtract sequence, for one extra [C, V] buffer."""
    if temperature != 1.0:
        logits.div_(temperature)
    return torch.log_softmax(logits, dim=-1)


def torch_divergence(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, grad_scale: torch.Tensor | None,
    *, temperature: float, direction: str, beta: float,
) -> torch.Tensor:
    """Per-row loss [C] (times T^2) of float logits [C, V]; torch twin of ``triton_divergence``.

    Both inputs are used as scratch (overwritten). When ``grad_scale`` [C] is given,
    ``student_logits`` ends up holding the gradient of ``sum(grad_scale * loss)`` with respect to
    the (un-tempered) student logits. Works in place, so a chunk needs about 3-5 [C, V] buffers.
    """
    log_q = _log_softmax(student_logits, temperature)
    log_p = _log_softmax(teacher_logits, temperature)
    if direction == "forward":
        p = log_p.exp()
        term = log_p.sub_(log_q).mul_(p)  # p (log p - log q)
        div = term.sum(-1)
        if not bool(torch.isfinite(div).all()):  # 0 * -inf where p underflowed: those terms are 0
            div = term.masked_fill_(p == 0, 0.0).sum(-1)
        grad = log_q.exp_().sub_(p) if grad_scale is not None else None  # q - p
    elif direction == "reverse":
        q = log_q.exp()
        log_ratio = log_p.neg_().add_(log_q)  # log q - log p
        div = (q * log_ratio).masked_fill_(q == 0, 0.0).sum(-1)
        grad = None
        if grad_scale is not None:  # q (log q - log p - KL)
            grad = log_ratio.sub_(div[:, None]).mul_(q).masked_fill_(q == 0, 0.0)
    else:
        q, p = log_q.exp(), log_p.exp()
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
        kl_pm = log_p.sub_(log_m).mul_(p).masked_fill_(p == 0, 0.0).sum(-1)
        del p
        log_q_over_m = log_q.sub_(log_m)
        kl_qm = (q * log_q_over_m).masked_fill_(q == 0, 0.0).sum(-1)
        div = beta * kl_pm + (1.0 - beta) * kl_qm
        grad = None
        if grad_scale is not None:  # (1 - beta) q (log q - log m - KL(q||m))
            grad = log_q_over_m.sub_(kl_qm[:, None]).mul_(q).masked_fill_(q == 0, 0.0)
            grad.mul_(1.0 - beta)
    if grad is not None:
        grad.mul_((grad_scale * temperature)[:, None])
        if grad.data_ptr() != student_logits.data_ptr():
            student_logits.copy_(grad)
    return div * temperature**2


def _divergence_fn(backend: str, dtype: torch.dtype):
    """The per-chunk divergence for ``backend`` (Triton handles float32 logits only)."""
    if backend == "triton" and dtype == torch.float32:
        from refteacher.kernels.kl_triton import triton_divergence

        return triton_divergence
    return torch_divergence


# ----------------------------------------------------------------------------- float32 matmuls

_MM_OUT_DTYPE_OK: dict[str, bool] = {}


def _mm_out_dtype_ok(device: torch.device) -> bool:
    """True when ``torch.mm(..., out_dtype=float32)`` runs on ``device`` (CUDA, recent torch)."""
    key = str(device)
    if key not in _MM_OUT_DTYPE_OK:
        ok = False
        if device.type == "cuda":
            try:
                a = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
                ok = torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
            except (TypeError, RuntimeError, NotImplementedError):
                ok = False
        _MM_OUT_DTYPE_OK[key] = ok
    return _MM_OUT_DTYPE_OK[key]


class _Head:
    """An LM head (weight [V, H], optional bias [V]) whose products come out in ``acc`` dtype.

    Low-precision weights are multiplied with a float32 *output* on CUDA (``mm(out_dtype=...)``,
    fp32 accumulation, no rounding to bf16), and upcast once per call elsewhere.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, acc: torch.dtype):
        self.weight, self.acc = weight, acc
        self.bias = None if bias is None else bias.to(acc)
        self.native = weight.dtype == acc
        self.out_dtype = not self.native and _mm_out_dtype_ok(weight.device)
        self.addmm_out_dtype = self.out_dtype
        self.weight_acc = weight if self.native or self.out_dtype else weight.to(acc)

    def _mm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``a @ b`` in ``acc`` (``b`` is the weight or its transpose)."""
        if self.out_dtype:
            return torch.mm(a.to(self.weight.dtype), b, out_dtype=self.acc)
        return a.to(self.acc) @ b

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[C, H] hidden -> [C, V] logits in ``acc`` (contiguous)."""
        w = self.weight if self.out_dtype else self.weight_acc
        out = self._mm(hidden, w.T)
        if self.bias is not None:
            out += self.bias
        return out

    def grad_hidden(self, dlogits: torch.Tensor) -> torch.Tensor:
        """[C, V] gradient of the logits -> [C, H] gradient of the hidden states, in ``acc``."""
        return self._mm(dlogits, self.weight if self.out_dtype else self.weight_acc)

    def add_grad_weight(
        self, grad_w: torch.Tensor, dlogits: torch.Tensor, hidden: torch.Tensor
    ) -> None:
        """``grad_w += dlogits^T @ hidden`` with ``grad_w`` [V, H] in ``acc``."""
        if self.out_dtype and self.addmm_out_dtype:
            try:
                low = dlogits.T.to(hidden.dtype)
                torch.addmm(grad_w, low, hidden, out_dtype=self.acc, out=grad_w)
                return
            except (TypeError, RuntimeError, NotImplementedError):
                self.addmm_out_dtype = False  # this torch build lacks it: exact fp32 from now on
        grad_w.addmm_(dlogits.T, hidden.to(self.acc))


# ----------------------------------------------------------------------------- the chunk loop


def default_chunk_size(vocab_size: int, device: torch.device) -> int:
    """Tokens per chunk so that a [C, V] float32 buffer stays near the per-device budget."""
    budget = _CHUNK_ELEMENTS["cuda" if device.type == "cuda" else "cpu"]
    return max(16, budget // max(1, vocab_size))


def _chunk_pass(
    inputs: tuple, rows: torch.Tensor, row_weight: torch.Tensor | None, options: dict,
    needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """One walk over the selected tokens ``rows`` (int64 [M]) in chunks.

    ``inputs`` = (student_hidden [N, Hs], student_weight [V, Hs], student_bias [V] | None,
    teacher_hidden [N, Ht], teacher_weight [V, Ht], teacher_bias [V] | None).
    Returns (losses [M] in the accumulate dtype, grad_hidden [N, Hs] in student_hidden's dtype,
    grad_weight [V, Hs] and grad_bias [V] in the accumulate dtype); the gradients (of
    ``sum(row_weight * losses)``) are None unless ``row_weight`` [M] is given and ``needs`` says so.
    """
    sh, sw, sb, th, tw, tb = inputs
    acc = options["acc"]
    student, teacher = _Head(sw, sb, acc), _Head(tw, tb, acc)
    divergence = _divergence_fn(options["backend"], acc)
    want_h, want_w, want_b = (n and row_weight is not None for n in needs)
    n_sel = rows.numel()
    losses = torch.empty(n_sel, dtype=acc, device=sh.device)
    grad_h = torch.zeros_like(sh) if want_h else None
    grad_w = torch.zeros(sw.shape, dtype=acc, device=sw.device) if want_w else None
    grad_b = torch.zeros(sw.shape[0], dtype=acc, device=sw.device) if want_b else None
    write_grad = want_h or want_w or want_b
    chunk = options["chunk_size"] or default_chunk_size(sw.shape[0], sh.device)
    for start in range(0, n_sel, chunk):
        idx = rows[start:start + chunk]
        hs = sh.index_select(0, idx)
        zs = student.logits(hs)
        zt = teacher.logits(th.index_select(0, idx))
        scale = row_weight[start:start + chunk].to(acc) if write_grad else None
        losses[start:start + chunk] = divergence(
            zs, zt, scale, temperature=options["temperature"],
            direction=options["direction"], beta=options["beta"],
        )
        del zt
        if want_h:
            grad_h.index_copy_(0, idx, student.grad_hidden(zs).to(sh.dtype))
        if want_w:
            student.add_grad_weight(grad_w, zs, hs)
        if want_b:
            grad_b += zs.sum(0)
    return losses, grad_h, grad_w, grad_b


def _selected_rows(mask: torch.Tensor | None, n_tokens: int, device: torch.device) -> torch.Tensor:
    """int64 indices of the tokens that count (all of them without a mask)."""
    if mask is None:
        return torch.arange(n_tokens, device=device)
    return mask.nonzero().flatten()


def _reduce(
    losses: torch.Tensor, rows: torch.Tensor, n_tokens: int, reduction: str
) -> torch.Tensor:
    """Apply ``reduction`` to per-selected-row losses; float32 (float64 for float64 inputs)."""
    if reduction == "none":
        out = losses.new_zeros(n_tokens)
        return out.index_copy_(0, rows, losses)
    total = losses.sum()
    return total / max(1, rows.numel()) if reduction == "mean" else total


def _uniform_weight(rows: torch.Tensor, reduction: str, dtype: torch.dtype) -> torch.Tensor:
    """Per-selected-row weight of the scalar loss: 1/M for ``mean``, 1 for ``sum``."""
    value = 1.0 / max(1, rows.numel()) if reduction == "mean" else 1.0
    return torch.full((rows.numel(),), value, dtype=dtype, device=rows.device)


class _FusedLinearKL(torch.autograd.Function):
    """Autograd wrapper of ``_chunk_pass``: gradients in forward (mean/sum), backward (none)."""

    @staticmethod
    def forward(ctx, sh, sw, sb, th, tw, tb, mask, options):  # noqa: D401 - autograd API
        rows = _selected_rows(mask, sh.shape[0], sh.device)
        grad_on = options["grad_enabled"]  # needs_input_grad stays True under no_grad
        needs = tuple(grad_on and ctx.needs_input_grad[i] for i in range(3))
        reduction = options["reduction"]
        eager = any(needs) and reduction != "none"
        weight = _uniform_weight(rows, reduction, options["acc"]) if eager else None
        inputs = (sh, sw, sb, th, tw, tb)
        losses, grad_h, grad_w, grad_b = _chunk_pass(inputs, rows, weight, options, needs)
        ctx.options, ctx.needs = options, needs
        if reduction == "none" and any(needs):
            ctx.save_for_backward(sh, sw, sb, th, tw, tb, rows)
        else:
            ctx.grads = (
                grad_h,
                None if grad_w is None else grad_w.to(sw.dtype),
                None if grad_b is None else grad_b.to(sb.dtype),
            )
        return _reduce(losses, rows, sh.shape[0], reduction)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        if ctx.options["reduction"] == "none":
            sh, sw, sb, th, tw, tb, rows = ctx.saved_tensors
            weight = grad_output.index_select(0, rows)
            inputs = (sh, sw, sb, th, tw, tb)
            _, gh, gw, gb = _chunk_pass(inputs, rows, weight, ctx.options, ctx.needs)
            grads = (
                gh,
                None if gw is None else gw.to(sw.dtype),
                None if gb is None else gb.to(sb.dtype),
            )
        else:
            grads = tuple(None if g is None else g * grad_output.to(g.dtype) for g in ctx.grads)
        return (*grads, None, None, None, None, None)


# ----------------------------------------------------------------------------- public API


def fused_linear_kl(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    direction: str = "forward",
    beta: float = 0.5,
    reduction: str = "mean",
    chunk_size: int | None = None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Distillation loss from hidden states and LM heads, without [N, V] logits.

    Args:
        student_hidden: [N, Hs] float32/bf16/fp16 (float64 for tests); receives a gradient.
        student_weight: [V, Hs], same dtype; gets a gradient only if it requires one.
        teacher_hidden: [N, Ht]; teacher_weight: [V, Ht] (same V). No gradient flows to them.
        mask: [N] bool, the tokens that count (None = all).
        temperature: > 0, divides both logits; the loss is multiplied by its square.
        direction: "forward" KL(teacher||student), "reverse" KL(student||teacher), or "jsd".
        beta: the JSD mixture weight of the teacher, 0 < beta < 1 (ignored otherwise).
        reduction: "mean" over selected tokens, "sum", or "none" ([N], 0 where unselected).
        chunk_size: tokens per chunk (None: about 16M logits per chunk on CPU, 64M on CUDA).
        student_bias, teacher_bias: optional [V] biases of the heads.
        backend: "auto" | "triton" | "torch" | "reference"; None reads REFTEACHER_KERNEL_BACKEND.

    Returns:
        float32 loss (float64 for float64 inputs): a scalar, or [N] for ``reduction="none"``.
    Raises:
        ValueError: mismatched vocabularies, shapes, dtypes or devices, or bad options.
    """
    _check_options(temperature, direction, beta, reduction)
    _check_linear_inputs(student_hidden, student_weight, teacher_hidden, teacher_weight,
                         student_bias, teacher_bias, mask)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size={chunk_size!r}; use a positive int or None")
    choice = select_backend(student_hidden, teacher_hidden, backend=backend)
    if choice == "reference":
        return fused_linear_kl_reference(
            student_hidden, student_weight, teacher_hidden, teacher_weight, mask=mask,
            temperature=temperature, direction=direction, beta=beta, reduction=reduction,
            student_bias=student_bias, teacher_bias=teacher_bias,
        )
    options = {
        "backend": choice, "temperature": float(temperature), "direction": direction,
        "beta": float(beta), "reduction": reduction, "chunk_size": chunk_size,
        "acc": _accumulate_dtype(student_hidden, teacher_hidden),
        "grad_enabled": torch.is_grad_enabled(),
    }
    return _FusedLinearKL.apply(
        student_hidden, student_weight, student_bias,
        teacher_hidden.detach(), teacher_weight.detach(),
        None if teacher_bias is None else teacher_bias.detach(), mask, options,
    )


class _LogitsKL(torch.autograd.Function):
    """``kl_div_logits`` through the chunked divergence; the logits gradient is made in forward."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, mask, options):  # noqa: D401
        rows = _selected_rows(mask, student_logits.shape[0], student_logits.device)
        reduction, acc = options["reduction"], options["acc"]
        needs_grad = options["grad_enabled"] and ctx.needs_input_grad[0]
        eager = needs_grad and reduction != "none"
        weight = _uniform_weight(rows, reduction, acc) if eager else None
        losses, grad = _logits_pass(student_logits, teacher_logits, rows, weight, options)
        ctx.options, ctx.grad = options, grad
        if reduction == "none" and needs_grad:
            ctx.save_for_backward(student_logits, teacher_logits, rows)
        return _reduce(losses, rows, student_logits.shape[0], reduction)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        if ctx.options["reduction"] == "none":
            student_logits, teacher_logits, rows = ctx.saved_tensors
            weight = grad_output.index_select(0, rows)
            _, grad = _logits_pass(student_logits, teacher_logits, rows, weight, ctx.options)
        else:
            grad = ctx.grad * grad_output.to(ctx.grad.dtype)
        return grad, None, None, None


def _logits_pass(student_logits, teacher_logits, rows, row_weight, options):
    """Chunked divergence over held logits: (losses [M], grad [N, V] in their dtype or None)."""
    acc = options["acc"]
    divergence = _divergence_fn(options["backend"], acc)
    n_sel, vocab = rows.numel(), student_logits.shape[1]
    losses = torch.empty(n_sel, dtype=acc, device=student_logits.device)
    grad = torch.zeros_like(student_logits) if row_weight is not None else None
    chunk = options["chunk_size"] or default_chunk_size(vocab, student_logits.device)
    for start in range(0, n_sel, chunk):
        idx = rows[start:start + chunk]
        zs = student_logits.index_select(0, idx).to(acc)
        zt = teacher_logits.index_select(0, idx).to(acc)
        scale = None if row_weight is None else row_weight[start:start + chunk].to(acc)
        losses[start:start + chunk] = divergence(
            zs, zt, scale, temperature=options["temperature"],
            direction=options["direction"], beta=options["beta"],
        )
        if grad is not None:
            grad.index_copy_(0, idx, zs.to(grad.dtype))
    return losses, grad


def kl_div_logits(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    direction: str = "forward",
    beta: float = 0.5,
    reduction: str = "mean",
    chunk_size: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """The ``fused_linear_kl`` loss from logits already held: student/teacher [N, V] (any float).

    Same options and result as ``fused_linear_kl``; the gradient flows to ``student_logits`` only
    (computed in float32, returned in its dtype). Raises ValueError on mismatched inputs.
    """
    _check_options(temperature, direction, beta, reduction)
    _check_logits_inputs(student_logits, teacher_logits, mask)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size={chunk_size!r}; use a positive int or None")
    choice = select_backend(student_logits, teacher_logits, backend=backend)
    if choice == "reference":
        return kl_div_logits_reference(
            student_logits, teacher_logits, mask=mask, temperature=temperature,
            direction=direction, beta=beta, reduction=reduction,
        )
    options = {
        "backend": choice, "temperature": float(temperature), "direction": direction,
        "beta": float(beta), "reduction": reduction, "chunk_size": chunk_size,
        "acc": _accumulate_dtype(student_logits, teacher_logits),
        "grad_enabled": torch.is_grad_enabled(),
    }
    return _LogitsKL.apply(student_logits, teacher_logits.detach(), mask, options)


# ----------------------------------------------------------------------------- reference twins


def kl_div_logits_reference(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    direction: str = "forward",
    beta: float = 0.5,
    reduction: str = "mean",
    chunk_size: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Naive twin of ``kl_div_logits``: upcast, ``log_softmax`` and ``F.kl_div`` on all [N, V].

    ``chunk_size`` and ``backend`` are accepted for signature parity and ignored.
    """
    del chunk_size, backend
    _check_options(temperature, direction, beta, reduction)
    _check_logits_inputs(student_logits, teacher_logits, mask)
    acc = _accumulate_dtype(student_logits, teacher_logits)
    log_q = F.log_softmax(student_logits.to(acc) / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.detach().to(acc) / temperature, dim=-1)
    if direction == "forward":  # kl_div(input, target) = sum target * (log target - input)
        per_token = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
    elif direction == "reverse":
        per_token = F.kl_div(log_p, log_q, reduction="none", log_target=True).sum(-1)
    else:
        log_m = torch.logsumexp(
            torch.stack([log_p + math.log(beta), log_q + math.log1p(-beta)]), dim=0
        )
        per_token = (
            beta * F.kl_div(log_m, log_p, reduction="none", log_target=True).sum(-1)
            + (1 - beta) * F.kl_div(log_m, log_q, reduction="none", log_target=True).sum(-1)
        )
    per_token = per_token * temperature**2
    if mask is not None:
        per_token = torch.where(mask, per_token, per_token.new_zeros(()))
    if reduction == "none":
        return per_token
    if reduction == "sum":
        return per_token.sum()
    count = per_token.shape[0] if mask is None else int(mask.sum())
    return per_token.sum() / max(1, count)


def fused_linear_kl_reference(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    direction: str = "forward",
    beta: float = 0.5,
    reduction: str = "mean",
    chunk_size: int | None = None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Naive twin of ``fused_linear_kl``: full [N, V] logits (float32 matmul), then
    ``kl_div_logits_reference``. Same arguments and result; ``chunk_size``/``backend`` ignored.
    """
    del chunk_size, backend
    _check_options(temperature, direction, beta, reduction)
    _check_linear_inputs(student_hidden, student_weight, teacher_hidden, teacher_weight,
                         student_bias, teacher_bias, mask)
    acc = _accumulate_dtype(student_hidden, teacher_hidden)

    def logits(hidden, weight, bias):
        return F.linear(hidden.to(acc), weight.to(acc), None if bias is None else bias.to(acc))

    student_logits = logits(student_hidden, student_weight, student_bias)
    with torch.no_grad():
        teacher_logits = logits(teacher_hidden, teacher_weight, teacher_bias)
    return kl_div_logits_reference(
        student_logits, teacher_logits, mask=mask, temperature=temperature,
        direction=direction, beta=beta, reduction=reduction,
    )
