"""Tests for refteacher.kernels.kl: every path against the naive twin, forward and backward.

Tolerances (stated once, used everywhere):
The twin runs in float64 on the same input values and serves as the truth.
- float32 paths: loss rtol 1e-5 / atol 1e-6; gradients within
  ``2e-4 * max|reference| + 1e-4 * |reference|`` elementwise (float32 sums over up to 50k
  vocabulary entries, and JSD's log q - log m cancels when q and m are close).
- bfloat16 inputs: loss rtol 1e-3;
  gradients within ``1e-2 * max|reference|`` (the returned gradients are rounded to bf16, 2^-8).
- float64 gradcheck on the torch path with torch's default tolerances.
The Triton path runs under ``TRITON_INTERPRET=1`` on small shapes (few rows, one big block).
"""
from __future__ import annotations

import importlib.util
import math
import re

import pytest
import torch

from refteacher.kernels.kl import (
    fused_linear_kl,
    fused_linear_kl_reference,
    kl_div_logits,
    kl_div_logits_reference,
)

HAS_TRITON = importlib.util.find_spec("triton") is not None
DIRECTIONS = ("forward", "reverse", "jsd")


@pytest.fixture
def interpret(monkeypatch):
    """Run the Triton kernel in its CPU interpreter for this test."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def make_inputs(n, hs, ht, vocab, *, dtype=torch.float32, seed=0, scale=1.0, bias=False):
    """Random student/teacher hidden states and heads whose logits have std about ``scale``."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, std=1.0):
        base = torch.float64 if dtype == torch.float64 else torch.float32
        return (torch.randn(*shape, generator=g, dtype=base) * std).to(dtype)

    inputs = {
        "student_hidden": rand(n, hs),
        "student_weight": rand(vocab, hs, std=scale / math.sqrt(hs)),
        "teacher_hidden": rand(n, ht),
        "teacher_weight": rand(vocab, ht, std=scale / math.sqrt(ht)),
    }
    if bias:
        inputs["student_bias"] = rand(vocab, std=0.5)
        inputs["teacher_bias"] = rand(vocab, std=0.5)
    for name in ("student_hidden", "student_weight", "student_bias"):
        if name in inputs:
            inputs[name].requires_grad_(True)
    return inputs


def loss_and_grads(fn, inputs, upstream=None, **options):
    """Loss from ``fn(**inputs, **options)`` and the gradients of the student tensors."""
    loss = fn(**inputs, **options)
    names = [k for k in ("student_hidden", "student_weight", "student_bias") if k in inputs]
    grads = torch.autograd.grad(loss, [inputs[k] for k in names], upstream)
    return loss.detach(), dict(zip(names, grads))


def assert_close_grads(got, want, rel_to_max, rtol=0.0, naive=None):
    """Each gradient within ``rel_to_max * max|want| + rtol * |want|`` elementwise, and finite.

    ``naive`` (optional): the same gradients from the plain twin run in the inputs' own dtype. Its
    largest error is added to the bound: a long fp32 reduction (a 50k-word vocabulary) rounds
    differently on different BLAS kernels, and the fused path is held to that accuracy at least.
    """
    assert got.keys() == want.keys()
    for name in want:
        g, w = got[name].double(), want[name].double()
        assert torch.isfinite(g).all(), name
        bound = rel_to_max * w.abs().max() + rtol * w.abs() + 1e-12
        if naive is not None:
            bound = bound + 2 * (naive[name].double() - w).abs().max()
        excess = ((g - w).abs() - bound).max().item()
        assert excess <= 0, f"{name}: max error {(g - w).abs().max().item():.3g} over bound"


def as_float64(inputs):
    """Float64 copies of ``inputs`` (same values), keeping which ones require grad."""
    return {k: v.detach().double().requires_grad_(v.requires_grad) for k, v in inputs.items()}


def compare_with_twin(inputs, *, fp32=True, upstream=None, **options):
    """Run the fused call on ``inputs`` and the twin on float64 copies of the same values (the
    truth); assert loss and gradients agree within the module's stated tolerances."""
    got_loss, got = loss_and_grads(fused_linear_kl, inputs, upstream, **options)
    options.pop("backend", None)
    options.pop("chunk_size", None)
    upstream64 = None if upstream is None else upstream.double()
    want_loss, want = loss_and_grads(
        fused_linear_kl_reference, as_float64(inputs), upstream64, **options
    )
    got_loss = got_loss.double()
    if fp32:
        _, naive = loss_and_grads(fused_linear_kl_reference, inputs, upstream, **options)
        torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
        assert_close_grads(got, want, 2e-4, 1e-4, naive=naive)
    else:
        torch.testing.assert_close(got_loss, want_loss, rtol=1e-3, atol=1e-5)
        assert_close_grads(got, want, 1e-2)
    return got_loss


# ----------------------------------------------------------------------------- torch path


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("reduction", ("mean", "sum", "none"))
@pytest.mark.parametrize("hidden", (576, 577))
def test_torch_path_matches_twin(direction, reduction, hidden):
    inputs = make_inputs(9, hidden, hidden + 64, 1000, seed=hidden, scale=3.0, bias=True)
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 0, 1, 1], dtype=torch.bool)
    upstream = torch.linspace(-1, 2, 9) if reduction == "none" else None
    compare_with_twin(
        inputs, upstream=upstream, mask=mask, temperature=1.5, direction=direction, beta=0.3,
        reduction=reduction, chunk_size=4, backend="torch",
    )


@pytest.mark.parametrize("vocab,hidden,direction", [(49152, 576, "forward"), (50257, 577, "jsd")])
def test_torch_path_large_vocab(vocab, hidden, direction):
    inputs = make_inputs(3, hidden, hidden, vocab, seed=vocab, scale=4.0)
    compare_with_twin(inputs, direction=direction, chunk_size=2, backend="torch")


def test_torch_path_bf16_matches_fp32_twin():
    inputs = make_inputs(6, 577, 576, 1000, dtype=torch.bfloat16, scale=4.0, bias=True)
    for direction in DIRECTIONS:
        compare_with_twin(inputs, fp32=False, direction=direction, temperature=2.0, backend="torch")


def test_bf16_logits_are_not_rounded_before_the_softmax():
    # Every logit gets +128 from one hidden unit, where bf16 spacing is 1.0: rounding the matmul
    # output to bf16 before the softmax (a known trap) ruins loss and gradients; the fused path
    # must stay within the bf16 tolerances of the float64 truth.
    inputs = make_inputs(8, 576, 576, 1000, dtype=torch.bfloat16, scale=2.0)
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        noise = (0.3 * torch.randn(8, 576, generator=g)).bfloat16()
        inputs["teacher_hidden"] = inputs["student_hidden"].detach() + noise
        inputs["teacher_weight"] = inputs["student_weight"].detach().clone()
        for name in ("student_hidden", "teacher_hidden"):
            inputs[name][:, 0] = 16.0
        for name in ("student_weight", "teacher_weight"):
            inputs[name][:, 0] = 8.0

    def rounded(student_hidden, student_weight, teacher_hidden, teacher_weight):
        student_logits = student_hidden @ student_weight.T  # bf16 output: rounded
        return kl_div_logits_reference(student_logits, teacher_hidden @ teacher_weight.T)

    naive_loss, naive = loss_and_grads(rounded, inputs)
    want_loss, want = loss_and_grads(fused_linear_kl_reference, as_float64(inputs))
    grad = naive["student_hidden"].double() - want["student_hidden"]
    assert grad.abs().max() > 0.2 * want["student_hidden"].abs().max(), "the trap must show here"
    assert abs(naive_loss.double() - want_loss) > 0.1 * want_loss
    compare_with_twin(inputs, fp32=False, backend="torch")


def test_auto_backend_on_cpu_is_the_chunked_path(monkeypatch):
    monkeypatch.delenv("REFTEACHER_KERNEL_BACKEND", raising=False)
    inputs = make_inputs(5, 16, 16, 50)
    loss = fused_linear_kl(**inputs)
    assert loss.grad_fn is not None and "FusedLinearKL" in type(loss.grad_fn).__name__
    monkeypatch.setenv("REFTEACHER_KERNEL_BACKEND", "reference")
    assert "FusedLinearKL" not in type(fused_linear_kl(**inputs).grad_fn).__name__


# ----------------------------------------------------------------------------- triton path


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("reduction", ("mean", "none"))
def test_triton_path_matches_twin(interpret, direction, reduction):
    inputs = make_inputs(4, 577, 576, 1000, seed=3, scale=3.0, bias=True)
    mask = torch.tensor([1, 0, 1, 1], dtype=torch.bool)
    upstream = torch.tensor([0.5, 1.0, -2.0, 1.5]) if reduction == "none" else None
    compare_with_twin(
        inputs, upstream=upstream, mask=mask, temperature=0.7, direction=direction, beta=0.6,
        reduction=reduction, chunk_size=3, backend="triton",
    )


@pytest.mark.parametrize(
    "direction,vocab", [("jsd", 50257), ("forward", 17000), ("reverse", 17000)]
)
def test_triton_path_loops_over_a_large_vocab(interpret, direction, vocab):
    inputs = make_inputs(2, 577, 577, vocab, seed=7, scale=4.0)  # 7 or 3 blocks of 8192
    compare_with_twin(inputs, direction=direction, backend="triton")


def test_triton_path_bf16(interpret):
    inputs = make_inputs(3, 576, 577, 1000, dtype=torch.bfloat16, scale=4.0)
    compare_with_twin(inputs, fp32=False, direction="reverse", backend="triton")


# ----------------------------------------------------------------------------- edge cases


BACKENDS = (
    "torch",
    pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="no triton")),
)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ("mean", "sum", "none"))
def test_all_tokens_masked_gives_zero_loss_and_zero_grads(monkeypatch, backend, reduction):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    inputs = make_inputs(5, 32, 24, 300, bias=True)
    mask = torch.zeros(5, dtype=torch.bool)
    upstream = torch.ones(5) if reduction == "none" else None
    loss, grads = loss_and_grads(
        fused_linear_kl, inputs, upstream, mask=mask, reduction=reduction, backend=backend
    )
    assert torch.equal(loss, torch.zeros_like(loss))
    for grad in grads.values():
        assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_one_token(monkeypatch, backend, direction):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    compare_with_twin(make_inputs(1, 40, 40, 333, scale=2.0), direction=direction, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_teacher_equal_to_student_gives_zero(monkeypatch, backend, direction):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    inputs = make_inputs(4, 48, 48, 500, scale=5.0)
    inputs["teacher_hidden"] = inputs["student_hidden"].detach().clone()
    inputs["teacher_weight"] = inputs["student_weight"].detach().clone()
    loss, grads = loss_and_grads(fused_linear_kl, inputs, direction=direction, temperature=2.0,
                                 backend=backend)
    assert abs(loss.item()) < 1e-6
    for grad in grads.values():
        assert grad.abs().max().item() < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_logits_of_magnitude_1e4_do_not_overflow(monkeypatch, backend, direction):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    inputs = make_inputs(3, 64, 64, 700, seed=5, scale=1e4)
    loss = compare_with_twin(inputs, direction=direction, backend=backend)
    assert torch.isfinite(loss)
    # such sharp, unrelated distributions are far apart (JSD is bounded by log 2 at beta=0.5)
    assert loss.item() > (0.5 if direction == "jsd" else 10.0)


def test_temperature_matches_a_hand_computed_kl():
    # Independent of the twin: KL(p || q) * T^2 written out with explicit probabilities.
    g = torch.Generator().manual_seed(11)
    zs = torch.randn(3, 17, generator=g, dtype=torch.float64) * 3
    zt = torch.randn(3, 17, generator=g, dtype=torch.float64) * 3
    temperature = 2.5
    p = torch.exp(zt / temperature) / torch.exp(zt / temperature).sum(-1, keepdim=True)
    q = torch.exp(zs / temperature) / torch.exp(zs / temperature).sum(-1, keepdim=True)
    expected = (p * (p / q).log()).sum(-1).mean() * temperature**2
    for fn in (kl_div_logits, kl_div_logits_reference):
        got = fn(zs, zt, temperature=temperature)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=0)
    eye_h = torch.eye(17, dtype=torch.float64)
    got = fused_linear_kl(zs, eye_h, zt, eye_h, temperature=temperature, backend="torch")
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_jsd_is_nan_free_when_both_probabilities_underflow(monkeypatch, backend):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    g = torch.Generator().manual_seed(2)
    zs = torch.randn(4, 300, generator=g)
    zt = torch.randn(4, 300, generator=g)
    zs[:, 100:] = -3000.0  # exp underflows to exactly 0 in both distributions
    zt[:, 100:] = -3000.0
    zs.requires_grad_(True)
    for beta in (0.1, 0.5, 0.9):
        loss = kl_div_logits(zs, zt, direction="jsd", beta=beta, backend=backend)
        (grad,) = torch.autograd.grad(loss, zs)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        # the underflowed tail adds nothing: same as the loss on the first 100 entries alone
        head = kl_div_logits_reference(zs[:, :100], zt[:, :100], direction="jsd", beta=beta)
        torch.testing.assert_close(loss, head, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_is_used(monkeypatch, backend):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    inputs = make_inputs(6, 32, 32, 200, scale=3.0)
    mask = torch.tensor([0, 1, 1, 0, 1, 0], dtype=torch.bool)
    masked = fused_linear_kl(**inputs, mask=mask, backend=backend)
    subset = {k: (v[mask] if k.endswith("hidden") else v) for k, v in inputs.items()}
    subset_loss = fused_linear_kl(**subset, backend=backend)
    torch.testing.assert_close(masked, subset_loss, rtol=1e-6, atol=0)
    assert abs(masked - fused_linear_kl(**inputs, backend=backend)) > 1e-3
    (grad,) = torch.autograd.grad(masked, inputs["student_hidden"])
    assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask]))
    assert (grad[mask].abs().sum(-1) > 0).all()


def test_teacher_gets_no_gradient_and_frozen_head_gets_none():
    inputs = make_inputs(4, 16, 16, 64)
    inputs["teacher_hidden"].requires_grad_(True)
    inputs["student_weight"].requires_grad_(False)
    fused_linear_kl(**inputs, backend="torch").backward()
    assert inputs["teacher_hidden"].grad is None
    assert inputs["student_weight"].grad is None
    assert inputs["student_hidden"].grad is not None


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_kl_div_logits_matches_twin(direction):
    g = torch.Generator().manual_seed(4)
    zs = (torch.randn(7, 1000, generator=g) * 4).requires_grad_(True)
    zt = torch.randn(7, 1000, generator=g) * 4
    mask = torch.tensor([1, 1, 0, 1, 0, 1, 1], dtype=torch.bool)
    for reduction in ("mean", "none"):
        upstream = torch.arange(7.0) if reduction == "none" else None
        got = kl_div_logits(zs, zt, mask=mask, direction=direction, temperature=1.3,
                            reduction=reduction, chunk_size=3, backend="torch")
        want = kl_div_logits_reference(zs, zt, mask=mask, direction=direction, temperature=1.3,
                                       reduction=reduction)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        (g_got,) = torch.autograd.grad(got, zs, upstream)
        (g_want,) = torch.autograd.grad(want, zs, upstream)
        torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-7)


# ----------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("reduction", ("mean", "none"))
def test_gradcheck_float64_torch_path(direction, reduction):
    inputs = make_inputs(5, 6, 4, 9, dtype=torch.float64, scale=2.0, bias=True)
    mask = torch.tensor([1, 0, 1, 1, 1], dtype=torch.bool)
    teacher = {k: v for k, v in inputs.items() if k.startswith("teacher")}

    def fn(student_hidden, student_weight, student_bias):
        return fused_linear_kl(
            student_hidden, student_weight, teacher["teacher_hidden"], teacher["teacher_weight"],
            teacher_bias=teacher["teacher_bias"], student_bias=student_bias, mask=mask,
            temperature=1.7, direction=direction, beta=0.35, reduction=reduction, chunk_size=2,
            backend="torch",
        )

    args = (inputs["student_hidden"], inputs["student_weight"], inputs["student_bias"])
    assert torch.autograd.gradcheck(fn, args, fast_mode=True)


def test_gradcheck_float64_kl_div_logits():
    g = torch.Generator().manual_seed(9)
    zs = torch.randn(4, 7, generator=g, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(4, 7, generator=g, dtype=torch.float64)
    for direction in DIRECTIONS:
        assert torch.autograd.gradcheck(
            lambda x: kl_div_logits(x, zt, direction=direction, temperature=0.8, chunk_size=3,
                                    backend="torch"), (zs,), fast_mode=True
        )


# ----------------------------------------------------------------------------- errors


def test_clear_errors_for_mismatched_inputs():
    base = make_inputs(4, 16, 12, 50)
    cases = {
        "vocabulary": dict(teacher_weight=torch.randn(51, 12)),
        "hidden size": dict(student_weight=torch.randn(50, 17)),
        "tokens": dict(teacher_hidden=torch.randn(5, 12)),
        "cast one": dict(teacher_hidden=torch.randn(4, 12, dtype=torch.float64)),
        "device": dict(teacher_weight=torch.empty(50, 12, device="meta")),
        "bool tensor": dict(mask=torch.ones(4)),
        "expected (4,)": dict(mask=torch.ones(3, dtype=torch.bool)),
        "direction": dict(direction="backward"),
        "strictly between": dict(direction="jsd", beta=1.0),
        "temperature": dict(temperature=0.0),
        "reduction": dict(reduction="max"),
        "student_bias": dict(student_bias=torch.randn(49)),
    }
    for needle, override in cases.items():
        with pytest.raises(ValueError, match=re.escape(needle)):
            fused_linear_kl(**{**base, **override})
    with pytest.raises(ValueError, match="vocabulary"):
        kl_div_logits(torch.randn(3, 10), torch.randn(3, 11))


def test_no_gradient_work_under_no_grad(monkeypatch):
    from refteacher.kernels import kl as kl_module

    with_gradients = []
    original = kl_module._chunk_pass

    def spy(inputs, rows, row_weight, options, needs):
        with_gradients.append(row_weight is not None)
        return original(inputs, rows, row_weight, options, needs)

    monkeypatch.setattr(kl_module, "_chunk_pass", spy)
    inputs = make_inputs(3, 8, 8, 20)
    with torch.no_grad():
        fused_linear_kl(**inputs, backend="torch")
    fused_linear_kl(**inputs, backend="torch")
    assert with_gradients == [False, True]


# ----------------------------------------------------------------------------- CUDA (compiled Triton)


def _on_cuda(inputs):
    return {k: v.detach().cuda().requires_grad_(v.requires_grad) for k, v in inputs.items()}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not HAS_TRITON, reason="needs CUDA and triton")
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_on_cuda_matches_twin(monkeypatch, direction, dtype):
    """The compiled kernel over a real vocabulary (50257: blocks plus a ragged tail), masked, with
    biases, several chunks; the twin runs in float64 on the GPU on the same values."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    inputs = _on_cuda(make_inputs(37, 577, 576, 50257, dtype=dtype, seed=5, scale=4.0, bias=True))
    mask = (torch.arange(37) % 5 != 0).cuda()
    compare_with_twin(inputs, fp32=dtype == torch.float32, mask=mask, temperature=0.7, direction=direction,
                      beta=0.6, chunk_size=16, backend="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not HAS_TRITON, reason="needs CUDA and triton")
def test_auto_backend_on_cuda_is_triton_and_agrees_with_torch_path(monkeypatch):
    from refteacher.kernels.dispatch import select_backend

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("REFTEACHER_KERNEL_BACKEND", raising=False)
    inputs = _on_cuda(make_inputs(64, 576, 576, 49152, dtype=torch.bfloat16, seed=9, scale=4.0))
    assert select_backend(inputs["student_hidden"]) == "triton"
    auto_loss, auto = loss_and_grads(fused_linear_kl, inputs)
    torch_loss, torch_grads = loss_and_grads(fused_linear_kl, inputs, backend="torch")
    torch.testing.assert_close(auto_loss, torch_loss, rtol=1e-4, atol=1e-6)
    assert_close_grads(auto, torch_grads, 1e-2)
