"""refteacher.kernels.cosine: every path against the naive twin, edge cases, errors, gradients.

The Triton kernel runs on CPU tensors in Triton's interpreter, which works only when
``TRITON_INTERPRET=1`` was set before triton was first imported (triton's own library functions
are decorated at import). When this process imported triton without it, the tests whose id
contains "triton" run again in a subprocess that sets it (``test_triton_paths_in_interpreter``);
on a GPU machine ``test_triton_on_cuda_matches_twin`` also runs the compiled kernel.
Tolerance: every path accumulates in float32 from the same (possibly bf16/fp16-rounded) inputs,
so they differ only in summation order: ``atol=2e-6`` on scores in [-1, 1] (float64: 1e-12).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from refteacher.kernels.cosine import refusal_scores, refusal_scores_reference


def _interpreter_live() -> bool:
    """True when triton was imported in interpreter mode (its library functions interpreted)."""
    try:
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False
    return isinstance(tl.zeros, InterpretedFunction)


INTERPRETER_LIVE = _interpreter_live()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
PATHS = ["torch", "triton", "reference"] if INTERPRETER_LIVE else ["torch", "reference"]
ATOL = 2e-6


@pytest.fixture(params=PATHS)
def path(request):
    """Each backend by name (the Triton one only where the interpreter is live)."""
    return request.param


@pytest.mark.skipif(INTERPRETER_LIVE, reason="the Triton cases run in this process already")
def test_triton_paths_in_interpreter():
    """Run this file's Triton cases in a fresh process with TRITON_INTERPRET=1 set at start."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    env.pop("REFTEACHER_KERNEL_BACKEND", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-k", "triton", "-p", "no:cacheprovider"],
        env=env, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed and int(passed.group(1)) >= 50, proc.stdout[-2000:]  # the Triton cases ran


def random_hidden(shape, dtype, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def random_feature(k, h, dtype=torch.float32, seed=1):
    shape = (h,) if k is None else (k, h)
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def exact_scores(rows: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
    """Cosines in float64 from the already-rounded inputs (an independent formula)."""
    x = rows.double()
    f = feature.double().reshape(-1, feature.shape[-1])
    out = (x @ f.T) / (x.norm(dim=-1, keepdim=True) * f.norm(dim=-1)[None, :])
    return out[:, 0] if feature.dim() == 1 else out


# ----------------------------------------------------------------------------- forward values


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("h", [576, 577, 1])
@pytest.mark.parametrize("k", [None, 1, 3])
def test_rows_match_twin(path, dtype, h, k):
    hidden = random_hidden((70, h), dtype)
    feature = random_feature(k, h, dtype=dtype if k == 3 else torch.float32)
    got = refusal_scores(hidden, feature, backend=path)
    want = refusal_scores_reference(hidden, feature)
    assert got.dtype == torch.float32
    assert got.shape == ((70,) if k is None else (70, k))
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.double(), exact_scores(hidden, feature), atol=ATOL, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pos_dtype", [torch.int64, torch.int32], ids=str)
def test_positions_gather_the_right_token(path, dtype, pos_dtype):
    batch, seq, h = 9, 13, 577
    hidden = random_hidden((batch, seq, h), dtype)
    positions = torch.tensor([0, 12, -1, -13, 5, 7, -2, 3, 11], dtype=pos_dtype)
    feature = random_feature(3, h)
    got = refusal_scores(hidden, feature, positions, backend=path)
    rows = torch.stack([hidden[b, int(p)] for b, p in enumerate(positions)])
    torch.testing.assert_close(got.double(), exact_scores(rows, feature), atol=ATOL, rtol=0)
    torch.testing.assert_close(
        got, refusal_scores_reference(hidden, feature, positions), atol=ATOL, rtol=0
    )


def test_strided_views_are_read_in_place(path):
    """[T, B, H] transposed to [B, T, H], and an [N, H] view with a hidden-dim stride of 2."""
    base = random_hidden((13, 9, 2 * 64), torch.bfloat16)
    hidden = base.transpose(0, 1)[:, :, ::2]  # [9, 13, 64], no unit stride anywhere
    positions = torch.arange(9) % 13
    feature = random_feature(None, 64)
    got = refusal_scores(hidden, feature, positions, backend=path)
    rows = hidden.contiguous()[torch.arange(9), positions]
    torch.testing.assert_close(got.double(), exact_scores(rows, feature), atol=ATOL, rtol=0)
    flat = base.reshape(117, 128)[:, ::2]
    got_flat = refusal_scores(flat, feature, backend=path)
    torch.testing.assert_close(got_flat.double(), exact_scores(flat, feature), atol=ATOL, rtol=0)


def test_torch_path_chunks_stitch_up(monkeypatch):
    """Small chunk budget: 4 rows per chunk, 13 rows -> a ragged last chunk, values and grads."""
    import refteacher.kernels.cosine as cosine

    monkeypatch.setattr(cosine, "_TORCH_CHUNK_ELEMENTS", {"cpu": 4 * 577, "cuda": 4 * 577})
    base = random_hidden((13, 3, 577), torch.bfloat16)
    positions = torch.tensor([0, 1, 2, -1, -2, -3, 0, 1, 2, 0, 1, 2, 0])
    feature = random_feature(3, 577)
    hidden = base.clone().requires_grad_(True)
    got = refusal_scores(hidden, feature, positions, backend="torch")
    got.sum().backward()
    ref_hidden = base.clone().requires_grad_(True)
    want = refusal_scores_reference(ref_hidden, feature, positions)
    want.sum().backward()
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    torch.testing.assert_close(hidden.grad.float(), ref_hidden.grad.float(), atol=1e-5, rtol=1e-2)


def test_many_features_span_several_programs(path):
    """K = 11 is more than one Triton program handles: the feature groups must stitch up."""
    hidden = random_hidden((100, 300), torch.bfloat16)
    feature = random_feature(11, 300)
    got = refusal_scores(hidden, feature, backend=path)
    torch.testing.assert_close(got.double(), exact_scores(hidden, feature), atol=ATOL, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_large_magnitudes_do_not_overflow(path, dtype):
    """|x| ~ 3e4 in fp16: x*x overflows fp16 (max 65504) unless squares are taken in fp32."""
    hidden = random_hidden((20, 577), dtype, scale=3e4).clamp(-6e4, 6e4)
    feature = random_feature(None, 577, dtype=dtype)
    got = refusal_scores(hidden, feature, backend=path)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), exact_scores(hidden, feature), atol=ATOL, rtol=0)


def test_float64_inputs_compute_in_float64(path):
    """float64 (for gradcheck) stays float64; the Triton path hands it to the torch path."""
    hidden = random_hidden((10, 33), torch.float64)
    feature = random_feature(2, 33, dtype=torch.float64)
    got = refusal_scores(hidden, feature, backend=path)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, exact_scores(hidden, feature), atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_rows_and_zero_feature_score_zero(path, dtype):
    hidden = random_hidden((6, 577), dtype)
    hidden[[1, 4]] = 0
    feature = random_feature(3, 577)
    feature[1] = 0
    got = refusal_scores(hidden, feature, backend=path)
    assert not torch.isnan(got).any()
    assert (got[[1, 4]] == 0).all() and (got[:, 1] == 0).all()
    nonzero = got[[0, 2, 3, 5]][:, [0, 2]]
    assert (nonzero != 0).all()
    torch.testing.assert_close(got, refusal_scores_reference(hidden, feature), atol=ATOL, rtol=0)


def test_tiny_norms_are_clamped_by_eps(path):
    """A row of norm 1e-9 (< eps=1e-8) scores dot / eps, as F.cosine_similarity does."""
    hidden = torch.tensor([[1e-9, 0.0], [3.0, 4.0]])
    feature = torch.tensor([1.0, 0.0])
    got = refusal_scores(hidden, feature, backend=path)
    torch.testing.assert_close(got, torch.tensor([0.1, 0.6]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("k", [None, 3])
def test_empty_inputs_give_empty_results(path, k):
    feature = random_feature(k, 16)
    want_rows = (0,) if k is None else (0, 3)
    got = refusal_scores(torch.zeros(0, 16, dtype=torch.bfloat16), feature, backend=path)
    assert got.shape == want_rows and got.dtype == torch.float32
    got3 = refusal_scores(
        torch.zeros(0, 5, 16), feature, torch.zeros(0, dtype=torch.long), backend=path
    )
    assert got3.shape == want_rows


# ----------------------------------------------------------------------------- errors


BAD_CALLS = {
    "hidden 1-D": (lambda: (torch.zeros(8), torch.zeros(8), None), "hidden must be"),
    "hidden 4-D": (lambda: (torch.zeros(2, 2, 2, 8), torch.zeros(8), None), "hidden must be"),
    "feature 3-D": (lambda: (torch.zeros(4, 8), torch.zeros(1, 1, 8), None), "feature must be"),
    "hidden size": (lambda: (torch.zeros(4, 8), torch.zeros(9), None), "last"),
    "int hidden": (lambda: (torch.zeros(4, 8, dtype=torch.int32), torch.zeros(8), None), "dtype"),
    "dtype mix": (
        lambda: (torch.zeros(4, 8, dtype=torch.float16), torch.zeros(8, dtype=torch.bfloat16), None),
        "does not match",
    ),
    "device mix": (lambda: (torch.zeros(4, 8), torch.zeros(8, device="meta"), None), "device"),
    "positions for 2-D": (
        lambda: (torch.zeros(4, 8), torch.zeros(8), torch.zeros(4, dtype=torch.long)),
        "positions=None",
    ),
    "missing positions": (lambda: (torch.zeros(2, 3, 8), torch.zeros(8), None), "pass positions"),
    "float positions": (lambda: (torch.zeros(2, 3, 8), torch.zeros(8), torch.zeros(2)), "int64"),
    "positions shape": (
        lambda: (torch.zeros(2, 3, 8), torch.zeros(8), torch.zeros(3, dtype=torch.long)),
        "one position per row",
    ),
    "position too big": (
        lambda: (torch.zeros(2, 3, 8), torch.zeros(8), torch.tensor([0, 3])),
        r"position 3 is outside \[-3, 3\)",
    ),
    "position too small": (
        lambda: (torch.zeros(2, 3, 8), torch.zeros(8), torch.tensor([-4, 0])),
        "position -4 is outside",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CALLS), ids=list(BAD_CALLS))
def test_bad_inputs_raise_clear_errors(path, case):
    make, message = BAD_CALLS[case]
    hidden, feature, positions = make()
    with pytest.raises(ValueError, match=message):
        refusal_scores(hidden, feature, positions, backend=path)


def test_unknown_backend_and_triton_without_interpreter(monkeypatch):
    hidden, feature = torch.zeros(2, 4), torch.ones(4)
    with pytest.raises(ValueError, match="not one of"):
        refusal_scores(hidden, feature, backend="cuda-magic")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        refusal_scores(hidden, feature, backend="triton")


@pytest.mark.skipif(not INTERPRETER_LIVE, reason="needs the Triton interpreter in this process")
def test_environment_variable_selects_the_triton_backend(monkeypatch):
    """REFTEACHER_KERNEL_BACKEND=triton must reach the Triton kernel (seen through its launch)."""
    import refteacher.kernels.cosine as cosine

    launched = []
    real = cosine._triton_scores
    monkeypatch.setattr(cosine, "_triton_scores", lambda *a: launched.append(1) or real(*a))
    monkeypatch.setenv("REFTEACHER_KERNEL_BACKEND", "triton")
    hidden, feature = random_hidden((4, 8), torch.float32), random_feature(None, 8)
    refusal_scores(hidden, feature)
    assert launched == [1]
    monkeypatch.setenv("REFTEACHER_KERNEL_BACKEND", "torch")
    refusal_scores(hidden, feature)
    assert launched == [1]


# ----------------------------------------------------------------------------- gradients


def test_gradcheck_torch_path_float64():
    hidden = random_hidden((4, 5, 7), torch.float64).requires_grad_(True)
    feature = random_feature(2, 7, dtype=torch.float64).requires_grad_(True)
    positions = torch.tensor([0, 4, -1, 2])

    def fn(h, f):
        return refusal_scores(h, f, positions, backend="torch")

    assert torch.autograd.gradcheck(fn, (hidden, feature))
    rows = random_hidden((6, 7), torch.float64, seed=3).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda h, f: refusal_scores(h, f[0], backend="torch"), (rows, feature)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gradients_match_twin_on_every_path(path, dtype):
    """The Triton path hands gradient-needing calls to the torch path; all match the twin."""
    base = random_hidden((5, 6, 577), dtype)
    positions = torch.tensor([1, -1, 0, 3, 5])
    feature_base = random_feature(3, 577)
    weights = random_feature(3, 5, seed=7).T.float()
    grads = {}
    for name, fn, backend in (("got", refusal_scores, path), ("want", refusal_scores_reference, None)):
        hidden = base.clone().requires_grad_(True)
        feature = feature_base.clone().requires_grad_(True)
        (fn(hidden, feature, positions, backend=backend) * weights).sum().backward()
        grads[name] = (hidden.grad.float(), feature.grad)
    assert grads["got"][0].abs().sum() > 0
    torch.testing.assert_close(grads["got"][0], grads["want"][0], atol=1e-5, rtol=1e-2)
    torch.testing.assert_close(grads["got"][1], grads["want"][1], atol=1e-5, rtol=1e-3)
    untouched = torch.ones(5, 6, dtype=torch.bool)
    untouched[torch.arange(5), positions] = False
    assert (grads["got"][0][untouched] == 0).all()


def test_empty_input_keeps_autograd_connected(path):
    hidden = torch.zeros(0, 8, requires_grad=True)
    refusal_scores(hidden, torch.ones(8), backend=path).sum().backward()
    assert hidden.grad is not None and hidden.grad.shape == (0, 8)


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or INTERPRETER_LIVE, reason="needs CUDA and compiled Triton"
)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [None, 3, 11])
def test_triton_on_cuda_matches_twin(dtype, k, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    hidden = random_hidden((1031, 4097), dtype).cuda()
    feature = random_feature(k, 4097).cuda()
    got = refusal_scores(hidden, feature, backend="triton")
    torch.testing.assert_close(got, refusal_scores_reference(hidden, feature), atol=ATOL, rtol=0)
    batch = random_hidden((7, 50, 4097), dtype).cuda()
    positions = torch.tensor([0, 49, -1, -50, 3, 17, 30], device="cuda")
    got = refusal_scores(batch, feature, positions, backend="triton")
    want = refusal_scores_reference(batch, feature, positions)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
