"""Running a decoder part of the way: to a layer (early exit), or to its final norm without the head."""
from __future__ import annotations

from typing import Any, Sequence

import torch

from refteacher.engine.errors import UserError

# --------------------------------------------------------------------------------------------
# Running a decoder up to one layer
# --------------------------------------------------------------------------------------------

def _unwrap(model):
    """Return the transformers model inside a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and type(model).__module__.startswith("peft"):
        return get_base()
    return model


def decoder_module(model) -> torch.nn.Module:
    """Return the decoder stack (the module with ``embed_tokens`` and ``layers``) of a causal LM."""
    inner = _unwrap(model)
    candidates = [inner]
    get_decoder = getattr(inner, "get_decoder", None)
    if callable(get_decoder):
        candidates.append(get_decoder())
    candidates.append(getattr(inner, "model", None))
    for module in candidates:
        if module is not None and isinstance(getattr(module, "layers", None), torch.nn.ModuleList):
            return module
    raise UserError(f"cannot find the decoder layers of {type(inner).__name__}; supported: Llama, Qwen2, Mistral, Gemma families")


def decoder_layers(model) -> torch.nn.ModuleList:
    """Return the ModuleList of decoder layers of a causal LM (peft-wrapped or not)."""
    return decoder_module(model).layers


def num_layers(model) -> int:
    """Return the number of decoder layers of a causal LM."""
    decoder = decoder_module(model)
    configured = getattr(getattr(decoder, "config", None), "num_hidden_layers", None)
    count = len(decoder.layers)
    return min(count, configured) if isinstance(configured, int) else count


def hidden_size(model) -> int:
    """Return the hidden size of a causal LM (the text model's, for multimodal configs)."""
    config = model.config
    get_text = getattr(config, "get_text_config", None)
    return int((get_text() if callable(get_text) else config).hidden_size)


class _StopForward(Exception):
    """Raised by a hook once every requested hidden state has been captured."""


def forward_to_layers(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    layers: Sequence[int],
    positions: torch.Tensor | None = None,
    decoder_kwargs: dict[str, Any] | None = None,
) -> list[torch.Tensor]:
    """Run the embedding and decoder layers up to ``max(layers)``; return the requested states.

    ``input_ids`` [B, T] long, ``attention_mask`` [B, T] (1 = token, 0 = padding) or None.
    Layer k means the output of decoder layer k (1-based), layer 0 the (scaled) embeddings: the
    same as ``output_hidden_states=True``'s ``hidden_states[k]`` for k < num_layers; for k =
    num_layers it is the last layer's output *before* the final norm. Returns one tensor per
    requested layer, in the order given: [B, T, H] in the model's dtype, or [B, H] when
    ``positions`` ([B] long, token index per row; negative counts from the end) is given.
    Gradients flow when autograd is enabled. Raises ValueError for a layer out of range.
    ``decoder_kwargs`` go to the decoder's forward (e.g. a KV cache of a shared prompt prefix with
    ``position_ids``; see ``feature.iter_last_token_states``); by default no cache is used.
    """
    total = num_layers(model)
    wanted = [int(k) for k in layers]
    if not wanted:
        raise ValueError("layers must name at least one layer")
    for k in wanted:
        if not 0 <= k <= total:
            raise ValueError(f"layer {k} is out of range: the model has layers 0..{total} (0 = embeddings)")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
    decoder = decoder_module(model)
    blocks = decoder.layers
    captured: dict[int, torch.Tensor] = {}
    last_needed = max(wanted)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    if positions is not None:
        positions = positions.to(input_ids.device).long() % input_ids.shape[1]

    def keep(k: int, hidden: torch.Tensor) -> None:
        captured[k] = hidden if positions is None else hidden[rows, positions]
        if k == last_needed:
            raise _StopForward

    handles = []
    try:
        for k in sorted(set(wanted)):
            if k < total:  # the input of block k is hidden_states[k]
                def pre_hook(module, args, kwargs, k=k):
                    keep(k, args[0] if args else kwargs["hidden_states"])

                handles.append(blocks[k].register_forward_pre_hook(pre_hook, with_kwargs=True))
            else:  # the output of the last block, before the final norm
                def post_hook(module, args, output, k=k):
                    keep(k, output[0] if isinstance(output, (tuple, list)) else output)

                handles.append(blocks[total - 1].register_forward_hook(post_hook))
        try:
            decoder(input_ids=input_ids, attention_mask=attention_mask, **{"use_cache": False, **(decoder_kwargs or {})})
        except _StopForward:
            pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [k for k in wanted if k not in captured]
    if missing:
        raise RuntimeError(f"the decoder of {type(decoder).__name__} never reached layers {missing}")
    return [captured[k] for k in wanted]


def forward_to_layer(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, layer: int) -> torch.Tensor:
    """Return the hidden states [B, T, H] after decoder layer ``layer`` (0 = embeddings).

    Runs only the embedding and layers 1..layer (no later layers, no final norm, no LM head).
    ``input_ids`` [B, T] long; ``attention_mask`` [B, T] or None (right padding is fine).
    """
    return forward_to_layers(model, input_ids, attention_mask, [layer])[0]


def hidden_at(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    layer: int,
    positions: torch.Tensor,
) -> torch.Tensor:
    """Return the hidden state [B, H] after layer ``layer`` at token ``positions[b]`` of each row.

    ``positions`` is [B] long (e.g. ``last_index`` from ``prompts.right_pad``).
    """
    return forward_to_layers(model, input_ids, attention_mask, [layer], positions=positions)[0]


def final_hidden_states(model, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Run a causal LM on packed rows; return its final hidden states, never its logits.

    ``input_ids`` and ``position_ids`` are [R, L] long (position_ids restart at 0 per example).
    Returns [R, L, H] in the model's dtype: the output of the decoder's final norm, i.e. what the
    LM head multiplies. The model is called through its own ``forward`` (so DDP / FSDP wrappers and
    peft see an ordinary call) with no attention mask, no KV cache and ``logits_to_keep`` set to an
    empty index, so no logits are computed; a forward hook on the decoder stack catches its output.
    """
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
