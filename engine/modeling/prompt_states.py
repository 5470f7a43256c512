"""Hidden states of prompts at their last token, with the shared token prefix run once.

Every chat-rendered prompt starts with the same tokens: SmolLM2's template puts 24 tokens of
system prompt and turn markup before every user turn, about half of a typical built-in prompt.
``PrefixCache`` runs that prefix once, batch 1, and hands each batch a copy of its KV cache, so
only the rest of each prompt goes through the decoder. Built with autograd on, gradients flow
from every batch back through the prefix states, so it serves a training step as well as scoring.
"""
from __future__ import annotations

import copy
import inspect
from typing import Any, Iterator, Sequence

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from refteacher.engine.errors import UserError
from refteacher.engine.modeling.chat_prompts import right_pad
from refteacher.engine.modeling.forward import decoder_module, forward_to_layers, hidden_size

MIN_SHARED_PREFIX = 8  # tokens; below this a prefix cache is not worth its bookkeeping


def shared_prefix_length(seqs: Sequence[Sequence[int]]) -> int:
    """Return the length of the token prefix common to all ``seqs``, leaving each at least one token."""
    if not seqs:
        return 0
    first = seqs[0]
    limit = min(len(s) for s in seqs) - 1
    length = 0
    while length < limit and all(s[length] == first[length] for s in seqs):
        length += 1
    return length


def cacheable_prefix(seqs: Sequence[Sequence[int]]) -> list[int]:
    """Return the token ids all ``seqs`` start with, or [] when that prefix is under MIN_SHARED_PREFIX."""
    shared = shared_prefix_length(seqs)
    return list(seqs[0][:shared]) if shared >= MIN_SHARED_PREFIX else []


class PrefixCache:
    """The KV cache of token ids ``prefix_ids`` after decoder layers 1..``depth`` (batch 1).

    Computed under the caller's grad mode: with autograd on, every batch that uses it
    back-propagates into the prefix states (and so into e.g. LoRA weights of those layers).
    """

    def __init__(self, model, prefix_ids: Sequence[int], depth: int):
        decoder = decoder_module(model)
        params = inspect.signature(decoder.forward).parameters
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.ids = [int(t) for t in prefix_ids]
        self.depth = depth
        self.cache = DynamicCache(config=decoder.config)
        device = next(model.parameters()).device
        ids = torch.tensor([self.ids], dtype=torch.long, device=device)
        forward_to_layers(model, ids, torch.ones_like(ids), [depth],
                          decoder_kwargs={self.cache_kwarg: self.cache, "use_cache": True})

    @classmethod
    def shared_by(cls, model, seqs: Sequence[Sequence[int]], depth: int) -> PrefixCache | None:
        """Return the cache of the prefix all ``seqs`` share, or None when it is under MIN_SHARED_PREFIX."""
        prefix = cacheable_prefix(seqs)
        return cls(model, prefix, depth) if prefix else None

    def __len__(self) -> int:
        return len(self.ids)

    def strip(self, seqs: Sequence[Sequence[int]]) -> list[Sequence[int]]:
        """Return each sequence without the prefix; ValueError if one does not start with it."""
        n = len(self.ids)
        for seq in seqs:
            if len(seq) <= n or list(seq[:n]) != self.ids:
                raise ValueError("a sequence does not start with the cached prefix (or is no longer than it)")
        return [seq[n:] for seq in seqs]

    def continue_with(self, attention_mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """The decoder inputs for a batch whose rows follow the prefix.

        ``attention_mask`` [B, T] covers the batch's own tokens. Returns (the mask widened over the
        prefix [B, len(prefix) + T], the other decoder kwargs: a batch copy of the cache, the
        original left as it is, ``use_cache`` and position ids [B, T] that continue after it).
        """
        batch, width = attention_mask.shape
        cache = copy.copy(self.cache)
        cache.layers = [copy.copy(layer) for layer in self.cache.layers]  # layers rebind, never mutate
        cache.batch_repeat_interleave(batch)
        n = len(self.ids)
        mask = torch.cat([attention_mask.new_ones(batch, n), attention_mask], dim=1)
        positions = torch.arange(n, n + width, device=attention_mask.device).expand(batch, width)
        return mask, {self.cache_kwarg: cache, "use_cache": True, "position_ids": positions}


def length_groups(lengths: Sequence[int], max_padding: float = 0.25) -> list[list[int]]:
    """Indices sorted by length and cut into consecutive groups, each at most ``max_padding`` padding
    once padded to its longest member (a group always takes at least one index)."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    groups: list[list[int]] = []
    current: list[int] = []
    real = 0
    for index in order:
        padded = (len(current) + 1) * lengths[index]
        if current and padded - (real + lengths[index]) > max_padding * padded:
            groups.append(current)
            current, real = [], 0
        current.append(index)
        real += lengths[index]
    if current:
        groups.append(current)
    return groups


def last_token_states(model, ids: Sequence[Sequence[int]], pad_id: int, layers: Sequence[int],
                      prefix: PrefixCache | None = None, *, max_padding: float | None = None) -> list[torch.Tensor]:
    """Hidden states after each of ``layers`` at every sequence's last token, as one right-padded batch.

    ``ids``: non-empty token id lists; with ``prefix`` each must start with its tokens, which are
    not run again (``prefix.depth`` must be at least ``max(layers)``). With ``max_padding`` the
    sequences run in length groups (``length_groups``) instead of one batch, so a few long ones do
    not pad every short one to their length; the states come back in the input order. Returns one
    tensor [B, H] per layer, in the model's dtype; gradients flow when autograd is on.
    """
    if max_padding is not None:
        groups = length_groups([len(seq) for seq in ids], max_padding)
        if len(groups) > 1:
            parts = [last_token_states(model, [ids[i] for i in group], pad_id, layers, prefix) for group in groups]
            order = torch.tensor([i for group in groups for i in group])
            inverse = torch.empty_like(order)
            inverse[order] = torch.arange(len(order))
            return [torch.cat([part[k] for part in parts])[inverse.to(parts[0][k].device)] for k in range(len(layers))]
    device = next(model.parameters()).device
    if prefix is None:
        input_ids, mask, last = right_pad(ids, pad_id, device=device)
        return forward_to_layers(model, input_ids, mask, layers, positions=last)
    if prefix.depth < max(layers):
        raise ValueError(f"the prefix cache reaches layer {prefix.depth}, not {max(layers)}")
    input_ids, mask, last = right_pad(prefix.strip(ids), pad_id, device=device)
    mask, extra = prefix.continue_with(mask)
    return forward_to_layers(model, input_ids, mask, layers, positions=last, decoder_kwargs=extra)


def iter_prompt_states(model, ids: Sequence[Sequence[int]], pad_id: int, layers: Sequence[int],
                       batch_size: int = 32, *, prefix_cache: bool = True, progress: bool = False,
                       desc: str = "prompts") -> Iterator[tuple[list[int], torch.Tensor]]:
    """Yield (indices into ``ids``, states float32 CPU [b, len(layers), H]) batch by batch, no grad.

    Prompts are batched by length, shortest first, to limit padding; the decoder runs only up to
    ``max(layers)``. With ``prefix_cache`` the prefix all prompts share runs once for all batches
    (equal to running it in every row up to float rounding). UserError for ``batch_size < 1``.
    """
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    bar = tqdm(total=len(ids), desc=desc, unit="prompt", disable=not progress, leave=False)
    try:
        with torch.no_grad():
            prefix = PrefixCache.shared_by(model, ids, max(layers)) if prefix_cache and ids else None
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            with torch.no_grad():
                states = last_token_states(model, [ids[i] for i in chunk], pad_id, layers, prefix)
            yield chunk, torch.stack(states, dim=1).float().cpu()
            bar.update(len(chunk))
    finally:
        bar.close()


def prompt_hidden(model, ids: Sequence[Sequence[int]], pad_id: int, layer: int, batch_size: int = 32,
                  progress: bool = False, desc: str = "scoring") -> torch.Tensor:
    """Hidden states [N, H] float32 (CPU) after ``layer`` at each prompt's last token, in input order."""
    out = torch.empty((len(ids), hidden_size(model)), dtype=torch.float32)
    for chunk, states in iter_prompt_states(model, ids, pad_id, [layer], batch_size, progress=progress, desc=desc):
        out[chunk] = states[:, 0]
    return out
