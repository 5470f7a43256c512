"""Turning prompts into model inputs: chat template, token ids, right-padded batches.

A prompt is either a string (one user turn) or a list of chat messages
(``{"role": ..., "content": ...}``). It is rendered with the tokenizer's chat template with the
generation prompt added, so the last token of the rendered prompt is the one the model would
answer from: the token the refusal filter scores.
"""
from __future__ import annotations

from typing import Sequence

import torch

from refteacher.engine.errors import UserError

Prompt = str | list[dict]


def _messages(prompt: Prompt) -> list[dict]:
    """Return a chat message list for a prompt (a string becomes one user turn; a PromptRecord gives its text)."""
    prompt = getattr(prompt, "prompt", prompt)
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, (list, tuple)) and all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
        return list(prompt)
    raise UserError(
        f"a prompt must be a string or a list of {{'role', 'content'}} messages, got {type(prompt).__name__}"
    )


def render_prompt(tokenizer, prompt: Prompt) -> str:
    """Return the prompt rendered by the tokenizer's chat template, generation prompt included."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            "the tokenizer has no chat template; use an instruction-tuned model (or add a chat_template "
            "to its tokenizer_config.json)"
        )
    return tokenizer.apply_chat_template(_messages(prompt), tokenize=False, add_generation_prompt=True)


def encode_prompts(
    tokenizer, prompts: Sequence[Prompt], *, max_tokens: int | None = None
) -> tuple[list[list[int]], list[bool]]:
    """Return (token ids of each rendered prompt, truncated flag per prompt).

    The ids are those of the chat-template rendering (special tokens come from the template, none
    are added). A prompt longer than ``max_tokens`` keeps its LAST ``max_tokens`` tokens, so the
    scored last token survives. One batched tokenizer call.
    """
    if max_tokens is not None and max_tokens < 1:
        raise UserError(f"max_tokens must be at least 1, got {max_tokens}")
    texts = [render_prompt(tokenizer, p) for p in prompts]
    if not texts:
        return [], []
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    truncated = [max_tokens is not None and len(seq) > max_tokens for seq in ids]
    if max_tokens is not None:
        ids = [list(seq[-max_tokens:]) for seq in ids]
    else:
        ids = [list(seq) for seq in ids]
    return ids, truncated


def pad_token_id(tokenizer) -> int:
    """Return the id to pad prompts with: the tokenizer's pad token, else its EOS token, else 0.

    Padding is always masked out, so any id in the vocabulary serves; these are the conventional ones.
    """
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def right_pad(
    seqs: Sequence[Sequence[int]], pad_id: int, *, device: str | torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad token id lists into a batch.

    Returns ``input_ids`` [B, T] long (T = longest sequence, padding = ``pad_id``),
    ``attention_mask`` [B, T] long (1 = token) and ``last_index`` [B] long (index of each row's
    last real token). Empty sequences are refused.
    """
    if not seqs:
        raise ValueError("right_pad needs at least one sequence")
    lengths = [len(s) for s in seqs]
    if min(lengths) == 0:
        raise ValueError("right_pad got an empty sequence")
    width = max(lengths)
    input_ids = torch.full((len(seqs), width), int(pad_id), dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        input_ids[row, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
        attention_mask[row, : len(seq)] = 1
    last_index = torch.as_tensor(lengths, dtype=torch.long) - 1
    if device is not None:
        input_ids, attention_mask, last_index = (t.to(device) for t in (input_ids, attention_mask, last_index))
    return input_ids, attention_mask, last_index
