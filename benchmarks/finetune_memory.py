"""Where the memory of one finetune step goes: each part computed from the shapes and measured.

Used by ``bench_finetune.py`` (not a benchmark of its own). The parts:

- **weights**: the student (base + LoRA) and, when the teacher is a separate model, its copy.
  Computed: parameter bytes. Measured: the memory taken by loading them.
- **LoRA gradients** and **AdamW state**: computed from the number of trainable weights
  (4 bytes each; AdamW keeps two moments). Measured: the gradients' bytes after backward, and
  the memory the first ``optimizer.step()`` takes.
- **saved activations**: what autograd keeps between forward and backward. Computed from the
  model's shapes with the per-token formula in ``activation_formula``; measured with
  ``torch.autograd.graph.saved_tensors_hooks`` (every distinct storage saved, the model's own
  weights excluded), split by what the tensors are (attention, MLP, hidden-size, LoRA, masks).
- **loss chunks**: the [chunk, V] float32 buffers of the chunked CE and the fused KL. Computed:
  buffers alive at once x chunk x V x 4; measured: the peak of the loss alone on the step's
  numbers of labelled tokens (with requires_grad hidden states).
- **allocator slack**: what the step's peak holds beyond the three above: transient buffers of
  the forward and backward and, on the CPU, heap pages glibc keeps after frees. Measured as a
  difference; on CUDA also ``max_memory_reserved - max_memory_allocated``.

Memory is read the same way everywhere: on the CPU the resident set (peak: ``VmHWM``, reset
through ``/proc/self/clear_refs``), on CUDA ``torch.cuda`` allocator counters.
"""
from __future__ import annotations

import os
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator

import torch

MIB = 2**20


class Meter:
    """Current and peak memory of this process on ``device`` (CPU: RSS, CUDA: allocated bytes)."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)

    def now(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated()
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return 0


# ----------------------------------------------------------------------------- saved activations


def _category(shape: tuple[int, ...], config, lora_rank: int) -> str:
    """What a saved tensor is, from its shape (the model's sizes tell the dimensions apart)."""
    hidden, inter = config.hidden_size, config.intermediate_size
    last = shape[-1] if shape else 0
    if last == config.vocab_size:
        return "logits"
    if len(shape) == 4 and shape[-1] == shape[-2]:
        return "attention mask"
    if len(shape) == 4 or (len(shape) == 3 and shape[1] == config.num_attention_heads):
        return "attention (q, k, v, output, logsumexp)"
    if last == inter:
        return "MLP (gate, up, act, product)"
    if last == lora_rank:
        return "LoRA A outputs"
    if last == hidden:
        return "hidden-size (norm inputs, normed, attention output)"
    return "other (norm scales, rotary, indices)"


@contextmanager
def saved_activations(model, lora_rank: int) -> Iterator[dict[str, int]]:
    """Count the bytes autograd saves inside the block: {category: bytes, "total": bytes}.

    Each storage counts once (views of one tensor, or a tensor saved by several ops); storages of
    the model's parameters (the frozen weights a matmul saves for its input gradient) are not
    activations and are left out.
    """
    config = model.config
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    totals: dict[str, int] = defaultdict(int)

    def pack(tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in seen and key not in params and key != 0:
            seen.add(key)
            size = storage.nbytes()
            totals[_category(tuple(tensor.shape), config, lora_rank)] += size
            totals["total"] += size
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield totals


def activation_formula(config, lora_rank: int, element_bytes: int) -> dict[str, float]:
    """Bytes saved per token per decoder layer for a LoRA-on-every-linear Llama-style layer.

    Counted in elements: two RMSNorms keep their input and the normed output (2 x 2H); attention
    keeps q, k and v after the rotary and GQA expansion, its output and logsumexp (4 x nh*hd + nh)
    and the o_proj input (nh*hd); the SwiGLU MLP keeps gate, up, act(gate) and their product
    (4 I); LoRA keeps each A output (7 r). The residual stream is not saved.
    """
    hidden, inter = config.hidden_size, config.intermediate_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    parts = {
        "norms": 4 * hidden,
        "attention": 5 * heads * head_dim + heads,
        "mlp": 4 * inter,
        "lora": 7 * lora_rank,
    }
    return {name: count * element_bytes for name, count in parts.items()}


# ----------------------------------------------------------------------------- the table


def component_rows(computed: dict[str, int], measured: dict[str, int], how: dict[str, str]) -> list[dict]:
    """Rows {component, computed_mib, measured_mib, how} in a fixed order, MiB with 1 decimal."""
    rows = []
    for name in computed.keys() | measured.keys():
        rows.append({"component": name,
                     "computed_mib": round(computed[name] / MIB, 1) if name in computed else None,
                     "measured_mib": round(measured[name] / MIB, 1) if name in measured else None,
                     "how_measured": how.get(name, "")})
    order = ["weights", "LoRA gradients", "AdamW state", "saved activations", "loss chunks (CE)",
             "loss chunks (CE), 1024-token chunks (before)", "loss chunks (KL)", "allocator slack and transients",
             "step peak"]
    rows.sort(key=lambda r: order.index(r["component"]) if r["component"] in order else len(order))
    return rows
