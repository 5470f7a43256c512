"""The finetune's data: rows read and encoded, packed into rows, paired with alignment rows."""
from __future__ import annotations

import logging
import os
from typing import Any, Iterable, Sequence

import torch

from refteacher.engine.data.chat_examples import IGNORE_INDEX, encode_example
from refteacher.engine.data.packing import collate_packed, pack_sequences
from refteacher.engine.data.readers import iter_rows, open_source
from refteacher.engine.errors import UserError

log = logging.getLogger("refteacher.engine.finetune")



# --------------------------------------------------------------------------------------------
# Data: rows -> token ids with response labels -> packed rows
# --------------------------------------------------------------------------------------------


def read_training_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a JSONL / CSV / Parquet file (or ``hf:NAME``) of chat rows; return the records in order.

    Each record has ``prompt`` + ``response`` or ``messages`` (see ``refteacher.engine.examples``).
    Raises UserError for an unreadable row (naming its id) or an empty file.
    """
    source = open_source(path)
    records = []
    for row in iter_rows(source):
        if row.reason is not None or row.record is None:
            raise UserError(f"{path}: row {row.id} cannot be used for training ({row.reason}); fix or drop it "
                            "(`refteacher filter` writes malformed rows to rejected.jsonl)")
        records.append(row.record)
    if not records:
        raise UserError(f"{path} holds no rows to train on")
    return records


def encode_rows(tokenizer, records: Sequence[dict[str, Any]], max_len: int, *, where: str = "data") -> list[tuple[list[int], list[int]]]:
    """Tokenise chat records into (input_ids, labels) pairs, truncated to ``max_len`` tokens.

    Labels are on assistant tokens only. Rows left with no label after truncation are dropped
    (logged); UserError when none survive.
    """
    examples = []
    dropped = 0
    for index, record in enumerate(records):
        try:
            ids, labels = encode_example(tokenizer, record, max_tokens=max_len)
        except UserError as err:
            raise UserError(f"{where} row {index + 1}: {err}") from None
        if sum(1 for y in labels[1:] if y != IGNORE_INDEX) == 0:
            dropped += 1
            continue
        examples.append((ids, labels))
    if dropped:
        log.warning("%s: %d rows had no response tokens within %d tokens and were dropped", where, dropped, max_len)
    if not examples:
        raise UserError(f"{where}: no row has response tokens within --max-len {max_len}; raise --max-len")
    return examples


def pack_examples(examples: Iterable[tuple[list[int], list[int]]], max_len: int) -> list:
    """Pack (input_ids, labels) examples into ``PackedRow``s of at most ``max_len`` tokens."""
    return list(pack_sequences(examples, max_len, overflow="truncate"))


class PairedRows(torch.utils.data.Dataset):
    """Dataset item i = {"task": task_rows[i], "align": align_rows[i % len(align_rows)] or None}."""

    def __init__(self, task_rows: Sequence, align_rows: Sequence | None = None):
        if not task_rows:
            raise UserError("no packed training rows; the data is empty")
        self.task_rows = list(task_rows)
        self.align_rows = list(align_rows) if align_rows else []

    def __len__(self) -> int:
        return len(self.task_rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        align = self.align_rows[index % len(self.align_rows)] if self.align_rows else None
        return {"task": self.task_rows[index], "align": align}


class PackedPairCollator:
    """Collate PairedRows items into one step's tensors.

    Returns ``input_ids``, ``labels``, ``position_ids`` ([R, L] long, or [1, T] when ``varlen``)
    for the task rows and, when the items carry alignment rows, the same under ``align_*`` keys.
    No attention mask: attention keeps to each example through ``position_ids``
    (``refteacher.engine.attention``).
    """

    def __init__(self, pad_token_id: int, varlen: bool = False):
        self.pad_token_id = int(pad_token_id)
        self.varlen = bool(varlen)

    def _collate(self, rows: Sequence) -> dict[str, torch.Tensor]:
        batch = collate_packed(rows, self.pad_token_id, flatten=self.varlen)
        return {k: batch[k] for k in ("input_ids", "labels", "position_ids")}

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self._collate([item["task"] for item in items])
        aligns = [item["align"] for item in items if item.get("align") is not None]
        if aligns:
            for key, value in self._collate(aligns).items():
                batch[f"align_{key}"] = value
        return batch
