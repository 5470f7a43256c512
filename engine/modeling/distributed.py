"""Running one training script in several processes (torchrun, ``accelerate launch``).

Both Trainer subclasses (the teacher's and the finetune's) call the same few helpers:

- ``launch_device``: the device of this process: ``cuda:LOCAL_RANK`` under a launcher, so the
  frozen teacher and the student of each rank sit on that rank's GPU.
- ``unwrap_model``: the module inside a ``DistributedDataParallel`` (or ``DataParallel``) wrapper,
  for losses that run parts of the model directly (early exit, a prefix cache, the LM head).
- ``average_gradients``: the all-reduce DDP would have done, for a step whose forward passes went
  around the DDP wrapper (DDP reduces only gradients of a forward it ran itself).
- ``mean_across_ranks``: logged loss parts averaged over ranks, so a log line of a W-process run
  reads like the 1-process run with the same global batch.
- ``is_main_process`` / ``barrier``: files outside the Trainer's checkpoints are written once.
- ``parameter_digest`` / ``gather_objects``: every rank's adapter fingerprint, to show they agree.

Outside a launcher (``WORLD_SIZE`` unset or 1) every helper is the identity or a no-op.
"""
from __future__ import annotations

import hashlib
import os
from typing import Iterable

import torch
import torch.distributed as dist


def world_size() -> int:
    """Processes in this run: the initialised process group's size, else the launcher's ``WORLD_SIZE``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's global rank: the process group's, else the launcher's ``RANK``, else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """True on the process that writes shared outputs (rank 0, or the only process)."""
    return rank() == 0


def _group_ready() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    """Wait for every rank (a no-op without a process group of more than one process)."""
    if _group_ready():
        dist.barrier()


def launch_device(spec: str | torch.device | None) -> torch.device:
    """The device this process trains on, from a ``--device`` value (None: the default).

    Under a launcher with CUDA present, None and a bare ``cuda`` mean ``cuda:LOCAL_RANK`` (one GPU
    per process); an explicit index (``cuda:1``) or ``cpu`` is kept. Outside a launcher: ``spec``,
    else cuda when a GPU is available, else cpu.
    """
    local = os.environ.get("LOCAL_RANK")
    cuda = torch.cuda.is_available()
    if spec is None:
        spec = "cuda" if cuda else "cpu"
    device = torch.device(spec)
    if device.type == "cuda" and device.index is None and local is not None and world_size() > 1:
        return torch.device("cuda", int(local))
    return device


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP, DataParallel or DeepSpeed engine wrappers (any depth); other models
    are returned as they are."""
    wrappers = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    while isinstance(model, wrappers) or type(model).__name__ == "DeepSpeedEngine":
        model = model.module
    return model


def is_ddp(model: torch.nn.Module) -> bool:
    """True when ``model`` is a torch ``DistributedDataParallel`` wrapper."""
    return isinstance(model, torch.nn.parallel.DistributedDataParallel)


def average_gradients(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Replace each trainable parameter's gradient by its mean over all ranks, in one all-reduce.

    Every rank must call it with the same parameters in the same order. Parameters without a
    gradient on this rank take part as zeros (so no rank waits on a missing tensor), and keep a
    zero gradient afterwards only if some rank had one. A no-op in a single process.
    """
    if not _group_ready():
        return
    params = [p for p in parameters if p.requires_grad]
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(g).to(g.dtype)
        offset += n


def mean_across_ranks(values: dict[str, float]) -> dict[str, float]:
    """``values`` averaged over all ranks (each rank passes the same keys, in the same order)."""
    if not _group_ready() or not values:
        return dict(values)
    keys = list(values)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    tensor /= dist.get_world_size()
    return dict(zip(keys, tensor.tolist()))


def gather_objects(value) -> list:
    """``value`` of every rank, in rank order (``[value]`` in a single process)."""
    if not _group_ready():
        return [value]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def parameter_digest(model: torch.nn.Module) -> str:
    """sha256 of the trainable parameters (names, shapes, dtypes and bytes, in name order), as hex.

    Equal on every rank of a data-parallel run whose gradients were averaged correctly.
    """
    digest = hashlib.sha256()
    named = sorted((n, p) for n, p in unwrap_model(model).named_parameters() if p.requires_grad)
    for name, param in named:
        tensor = param.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
