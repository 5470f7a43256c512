"""Attention over packed rows: no token ever attends across an example boundary.

A packed row holds several examples back to back, with ``position_ids`` restarting at 0 for each
(see ``refteacher.engine.packing``). Two ways keep the examples apart, both driven by
``position_ids`` alone (no ``attention_mask`` is passed):

- **varlen** (CUDA with ``flash-attn`` installed): the rows are flattened into one ``[1, T]`` row
  and transformers' flash-attention path reads the sequence boundaries from ``position_ids``
  (``flash_attn_varlen_func``): no padding and no wasted attention at all.
- **block mask** (everything else, CPU included): rows stay ``[R, L]``; with no 2-D attention mask
  and no KV cache, transformers (5.x, sdpa and eager) finds where ``position_ids`` restart and
  builds a block-diagonal causal mask, so each example sees only itself. Padding after a row's
  tokens forms its own dummy sequence (positions 0, 1, ...) and carries no labels.

Both need ``use_cache=False`` in the forward call: with a cache transformers skips the packed-
sequence detection. ``final_hidden_states`` does that.
"""
from __future__ import annotations

import importlib.util

import torch

from refteacher.engine.errors import UserError

VARLEN_IMPLEMENTATION = "flash_attention_2"
_PACKING_AWARE = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


def flash_attn_installed() -> bool:
    """Return True when the ``flash_attn`` package can be imported (it is not imported here)."""
    return importlib.util.find_spec("flash_attn") is not None


def choose_attention(device: str | torch.device) -> str:
    """Return the attention implementation to train packed rows with on ``device``.

    "flash_attention_2" on CUDA when flash-attn is installed (varlen path), else "sdpa".
    """
    if torch.device(device).type == "cuda" and flash_attn_installed():
        return VARLEN_IMPLEMENTATION
    return "sdpa"


def attention_of(model) -> str:
    """Return the attention implementation name a loaded transformers model uses."""
    config = getattr(model, "config", None)
    name = getattr(config, "_attn_implementation", None) if config is not None else None
    return str(name or "eager")


def prepare_for_packing(model, device: str | torch.device) -> bool:
    """Switch ``model`` to the packing attention for ``device``; return True for the varlen path.

    Raises UserError when the model's attention implementation cannot keep packed examples apart.
    """
    wanted = choose_attention(device)
    if attention_of(model) != wanted:
        setter = getattr(model, "set_attn_implementation", None)
        if callable(setter):
            setter(wanted)
    current = attention_of(model)
    if current not in _PACKING_AWARE:
        raise UserError(
            f"attention implementation {current!r} cannot keep packed examples apart; "
            "load the model with attn_implementation='sdpa' (or flash_attention_2 on CUDA)"
        )
    return current.startswith("flash_attention")


def final_hidden_states(model, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Run a causal LM on packed rows; return its final hidden states, never its logits.

    ``input_ids`` and ``position_ids`` are [R, L] long (position_ids restart at 0 per example).
    Returns [R, L, H] in the model's dtype: the output of the decoder's final norm, i.e. what the
    LM head multiplies. The model is called through its own ``forward`` (so DDP / FSDP wrappers and
    peft see an ordinary call) with no attention mask, no KV cache and ``logits_to_keep`` set to an
    empty index, so no logits are computed; a forward hook on the decoder stack catches its output.
    """
    from refteacher.engine.models import decoder_module

    decoder = decoder_module(getattr(model, "module", model))
    captured: list[torch.Tensor] = []

    def keep(module, args, output):
        captured.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

    handle = decoder.register_forward_hook(keep)
    try:
        model(
            input_ids=input_ids,
            position_ids=position_ids,
            use_cache=False,
            logits_to_keep=torch.empty(0, dtype=torch.long, device=input_ids.device),
        )
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"expected one output of the decoder stack, caught {len(captured)}")
    return captured[0]


def lm_head_of(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return (weight [V, H], bias [V] or None) of a causal LM's output layer (peft-wrapped or not)."""
    model = getattr(model, "module", model)  # DDP / DataParallel wrappers
    get_output = getattr(model, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else None
    if head is None:
        raise UserError(f"{type(model).__name__} has no output embeddings (LM head); pass a causal LM")
    return head.weight, getattr(head, "bias", None)
