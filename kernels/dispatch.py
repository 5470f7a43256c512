"""Backend choice for every fused operation.

``REFTEACHER_KERNEL_BACKEND`` (read at each call) picks the implementation:

- ``auto`` (default): Triton for CUDA tensors, the chunked PyTorch path on CPU.
- ``triton``: always Triton. On CPU this needs ``TRITON_INTERPRET=1`` set before triton is
  imported (slow; meant for tests on small shapes).
- ``torch``: always the chunked PyTorch path.
- ``reference``: the naive PyTorch twin (full materialisation), for debugging and benchmarks.
"""
from __future__ import annotations

import os

import torch

BACKEND_ENV = "REFTEACHER_KERNEL_BACKEND"
BACKENDS = ("auto", "triton", "torch", "reference")


def triton_available() -> bool:
    """Return True when triton imports (it may be missing on non-Linux platforms)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreting() -> bool:
    """Return True when Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def select_backend(*tensors: torch.Tensor, backend: str | None = None) -> str:
    """Return the backend ("triton", "torch" or "reference") to use for ``tensors``.

    ``backend`` overrides the environment variable; both accept the names in ``BACKENDS``.
    Raises ValueError for an unknown name, or when Triton is forced where it cannot run.
    """
    choice = (backend or os.environ.get(BACKEND_ENV, "auto")).strip().lower()
    if choice not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={choice!r} is not one of {', '.join(BACKENDS)}")
    on_cuda = any(t is not None and t.is_cuda for t in tensors)
    if choice == "auto":
        return "triton" if on_cuda and triton_available() else "torch"
    if choice == "triton":
        if not triton_available():
            raise ValueError("the triton backend was asked for but triton is not installed")
        if not on_cuda and not triton_interpreting():
            raise ValueError(
                "the triton backend on CPU tensors needs TRITON_INTERPRET=1 "
                "(set before triton is first imported)"
            )
    return choice
