"""Training examples: chat rows turned into token ids with labels on the assistant's tokens only.

A row is either ``{"prompt": str, "response": str}`` or ``{"messages": [{"role", "content"}, ...]}``
(the chat format fine-tuning services take). The conversation is rendered with the tokenizer's
chat template; every assistant turn (its text and its end-of-turn marker) carries labels, every
other token gets -100.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from refteacher.engine.errors import UserError

IGNORE_INDEX = -100


def row_messages(row: Mapping[str, Any]) -> list[dict[str, str]]:
    """Return the chat messages of a training row (prompt/response or messages); UserError if neither."""
    if row.get("messages") is not None:  # a null messages cell (a Parquet column) means prompt/response
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise UserError("'messages' must be a non-empty list of {role, content} objects")
        out = []
        for turn in messages:
            if not isinstance(turn, Mapping) or not isinstance(turn.get("content"), str) or "role" not in turn:
                raise UserError("every message needs a 'role' and a string 'content'")
            out.append({"role": str(turn["role"]), "content": turn["content"]})
        return out
    prompt, response = row.get("prompt"), row.get("response")
    if not isinstance(prompt, str) or not isinstance(response, str):
        raise UserError("a training row needs string 'prompt' and 'response' fields, or 'messages'")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def _render(tokenizer, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
    )


def chat_pieces(tokenizer, row: Mapping[str, Any]) -> list[tuple[str, bool]]:
    """The rendered text of one training row, cut at turn boundaries: ``[(text, is_assistant), ...]``.

    Each assistant turn (its text and end-of-turn marker) is one piece, the text before it another,
    so that tokenising the pieces one by one aligns labels exactly with tokens. UserError when the
    row has no assistant turn or the chat template does not render turns as prefixes.
    """
    messages = row_messages(row)
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError("a training row needs at least one assistant turn to learn from")
    pieces: list[tuple[str, bool]] = []
    rendered = ""
    for i, turn in enumerate(messages):
        if turn["role"] == "assistant":
            before = _render(tokenizer, messages[:i], add_generation_prompt=True)
            after = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
            if not before.startswith(rendered) or not after.startswith(before):
                raise UserError("the tokenizer's chat template does not render turns as prefixes; "
                                "pass pre-rendered text instead")
            pieces.append((before[len(rendered):], False))
            pieces.append((after[len(before):], True))
            rendered = after
    return pieces


def encode_pieces(
    tokenizer, rows_pieces: Sequence[Sequence[tuple[str, bool]]], *, max_tokens: int | None = None
) -> list[tuple[list[int], list[int]]]:
    """Tokenise the ``chat_pieces`` of many rows in one tokenizer call; one ``(input_ids, labels)``
    pair of equal-length int lists per row, labels -100 off the assistant pieces, each row cut to
    its first ``max_tokens`` tokens."""
    texts = [text for pieces in rows_pieces for text, _ in pieces if text]
    encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    out = []
    for pieces in rows_pieces:
        input_ids: list[int] = []
        labels: list[int] = []
        for text, is_assistant in pieces:
            ids = next(encoded) if text else []
            input_ids.extend(ids)
            labels.extend(ids if is_assistant else [IGNORE_INDEX] * len(ids))
        if max_tokens is not None:
            input_ids, labels = input_ids[:max_tokens], labels[:max_tokens]
        out.append((input_ids, labels))
    return out


def encode_example(
    tokenizer, row: Mapping[str, Any], *, max_tokens: int | None = None
) -> tuple[list[int], list[int]]:
    """Tokenise one training row; return ``(input_ids, labels)``, equal-length int lists.

    ``labels[i]`` is ``input_ids[i]`` on assistant tokens and -100 elsewhere. The text is split at
    turn boundaries and each piece tokenised on its own, so labels align exactly with tokens.
    ``max_tokens`` truncates from the end (the first tokens are kept). UserError when the row has
    no assistant turn. Many rows at once: ``chat_pieces`` per row, then ``encode_pieces``.
    """
    return encode_pieces(tokenizer, [chat_pieces(tokenizer, row)], max_tokens=max_tokens)[0]


def pad_examples(examples: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int) -> dict[str, Any]:
    """Right-pad (input_ids, labels) examples into a batch.

    Returns ``{"input_ids", "labels", "attention_mask"}``, each a long tensor [B, T] with T the
    longest example: ``pad_id`` / -100 / 0 on padding.
    """
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[row, : len(labs)] = torch.tensor(labs, dtype=torch.long)
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}
