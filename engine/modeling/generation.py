"""Batched greedy generation: length-sorted, left-padded batches through ``model.generate``.

Used for the teacher's helpful answers (the model's own greedy answers to harmless prompts) and
by the evaluation (does the teacher refuse harmful prompts?). Prompts are rendered with the chat
template, sorted by length so batches carry little padding, and the answers are returned in the
input order.
"""
from __future__ import annotations

from typing import Sequence

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

from refteacher.engine.errors import UserError
from refteacher.engine.modeling.chat_prompts import encode_prompts, pad_token_id


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists; return ``input_ids`` [B, T] long and ``attention_mask`` [B, T] long."""
    if not seqs or min(len(s) for s in seqs) == 0:
        raise ValueError("left_pad needs at least one non-empty sequence")
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), int(pad_id), dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        input_ids[row, width - len(seq):] = torch.as_tensor(list(seq), dtype=torch.long)
        attention_mask[row, width - len(seq):] = 1
    return input_ids, attention_mask


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: Sequence[str | list[dict]],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    max_prompt_tokens: int | None = 512,
    progress: bool = True,
    desc: str = "generating",
) -> list[str]:
    """Return the greedy answer (decoded text, special tokens dropped) to every prompt, in order.

    ``prompts`` are strings (one user turn) or chat message lists; each is rendered with the chat
    template. Generation stops at the end-of-turn token or after ``max_new_tokens`` tokens.
    Runs on the model's device; the model is left in the train/eval mode it was in.
    """
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if batch_size < 1:
        raise UserError(f"batch_size must be at least 1, got {batch_size}")
    if not prompts:
        return []
    ids, _ = encode_prompts(tokenizer, list(prompts), max_tokens=max_prompt_tokens)
    pad_id = pad_token_id(tokenizer)
    stop_ids = {i for i in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")) if isinstance(i, int) and i >= 0}
    device = next(model.parameters()).device
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    answers: list[str] = [""] * len(ids)
    was_training = model.training
    model.eval()
    try:
        bar = tqdm(total=len(ids), desc=desc, unit="prompt", disable=not progress, leave=False)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            input_ids, attention_mask = left_pad([ids[i] for i in rows], pad_id)
            out = _greedy(model, input_ids.to(device), attention_mask.to(device), max_new_tokens, stop_ids, pad_id)
            for row, tokens in zip(rows, out):
                answers[row] = tokenizer.decode(tokens, skip_special_tokens=True).strip()
            bar.update(len(rows))
        bar.close()
    finally:
        model.train(was_training)
    return answers


def _greedy(model, input_ids, attention_mask, max_new_tokens, stop_ids, pad_id) -> list[list[int]]:
    """Greedy decoding of one left-padded batch with ``model.generate``; return the new tokens of
    each row, cut at its first stop token."""
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=sorted(stop_ids),
                              pad_token_id=pad_id)
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
    result = []
    for row in out[:, input_ids.shape[1]:].tolist():
        kept = []
        for t in row:
            if t in stop_ids or t == pad_id:
                break
            kept.append(t)
        result.append(kept)
    return result
