"""Shared measuring tools for every benchmark: timing, peak memory, environment, JSON output, and
reading a finished quickstart run.

Peak memory is measured the same way for both sides of a comparison:
- CUDA: ``torch.cuda.max_memory_allocated`` above what was allocated before the call.
- CPU: the process's resident set size, sampled every ~0.5 ms by a thread while the call runs,
  above the RSS before it. glibc keeps freed blocks of up to 32 MB for reuse, which hides them
  from RSS; call ``exact_cpu_rss()`` once, after all timings (it slows allocation), so every
  tensor buffer is mmap-ed and the figures are exact.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Return this process's current resident set size in bytes (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return 0


def _synchronize(device: str | torch.device | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_call(
    fn: Callable[[], Any], *, repeat: int = 5, warmup: int = 1, device: str | torch.device | None = None
) -> dict[str, float]:
    """Time ``fn()`` ``repeat`` times after ``warmup`` untimed calls.

    Returns ``{"median_ms", "min_ms", "mean_ms", "repeat"}``. For CUDA work pass ``device`` so
    each call is synchronised before the clock stops.
    """
    for _ in range(warmup):
        fn()
    _synchronize(device)
    times = []
    for _ in range(max(1, repeat)):
        start = time.perf_counter()
        fn()
        _synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return {
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "mean_ms": statistics.fmean(times),
        "repeat": len(times),
    }


def exact_cpu_rss() -> None:
    """Make CPU peak memory visible to RSS sampling from now on.

    glibc raises its mmap threshold after a large free, so repeated calls reuse heap memory and
    RSS no longer moves; fixing the threshold at 64 KiB sends every tensor buffer to mmap again.
    It also makes each allocation slower, so it is switched on only after all timings are taken.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 64 * 1024)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc: RSS figures may read low
        pass


def release_freed_memory() -> None:
    """Hand glibc's free heap pages back to the OS (``malloc_trim``), so a measurement does not
    reuse, unseen, the pages that an earlier run just freed. A no-op where libc is not glibc."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory(fn: Callable[[], Any], device: str | torch.device = "cpu") -> int:
    """Run ``fn()`` once and return the peak extra memory it used, in bytes (see module doc)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return max(0, torch.cuda.max_memory_allocated() - base)
    release_freed_memory()
    base = rss_bytes()
    peak = base
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_bytes())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    return max(0, max(peak, rss_bytes()) - base)


def device_name(device: str | torch.device = "cpu") -> str:
    """Return a human-readable name of ``device``: the GPU model, or the CPU model and core count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores)"


def environment(device: str | torch.device = "cpu") -> dict[str, Any]:
    """Return the facts a benchmark result needs to be read: device, versions, threads, time."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_name(device),
        "device_type": torch.device(device).type,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_json(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write ``payload`` as indented JSON to ``path`` (parents created); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    return path


def quickstart_run(out: str | os.PathLike) -> tuple[dict[str, Any], Any]:
    """(the run.json details, the QuickstartConfig) of the finished quickstart in ``out``, for the
    benchmarks that reuse its models; a wrong ``--run`` exits with the message, not a traceback."""
    from refteacher.engine.errors import UserError
    from refteacher.engine.quickstart import read_run

    try:
        return read_run(out)
    except UserError as error:
        raise SystemExit(str(error)) from None


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Return ``rows`` as a Markdown table with the given ``columns`` (floats to 3 significant)."""

    def fmt(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
