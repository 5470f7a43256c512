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
