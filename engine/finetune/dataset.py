"""The finetune's data, streamed: rows read and tokenised in batches, packed, stored on disk.

``pack_records`` is the stream: chat records (from ``read_records``, one at a time) are rendered and
tokenised ``ENCODE_BATCH_ROWS`` at a time, cut to ``max_len`` tokens, and go through the compiled
best-fit-decreasing packer (``pack_sequences``, a window of examples) as they come. No step holds
more than a batch of rows, the packer's window and its open rows, whatever the dataset's size.

A Parquet file that is tokenised already (an ``input_ids`` list column, optional ``labels``) skips
all of that: ``pack_tokenised_parquet`` hands each record batch's Arrow columns to ``pack_arrow``,
which reads their values and offsets in place.

``build_packed_rows`` writes that stream to a folder of flat binary files and returns a
``PackedRowStore``: a read-only sequence of ``PackedRow`` over memory-mapped files, which the
Trainer's sampler shuffles and indexes like a list (so a resumed run sees exactly the batches an
uninterrupted one would) while the process holds only the pages it reads. A store whose manifest
matches the input, tokenizer and settings is reused (``--resume`` does not tokenise again).

Training semantics are today's: labels on assistant tokens only (-100 elsewhere, ``IGNORE_INDEX``),
rows longer than ``max_len`` cut to their first ``max_len`` tokens, rows left with no label after
the first token dropped (counted and logged), and the same packed rows as packing the whole list.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from itertools import islice, tee
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from refteacher.engine.data.chat_examples import IGNORE_INDEX, chat_pieces, encode_pieces
from refteacher.engine.data.packing import (
    DEFAULT_MAX_OPEN,
    DEFAULT_WINDOW,
    PackedRow,
    collate_packed,
    pack_arrow,
    pack_sequences,
)
from refteacher.engine.data.readers import open_source, read_records
from refteacher.engine.errors import UserError

log = logging.getLogger("refteacher.engine.finetune")

ENCODE_BATCH_ROWS = 256  # rows rendered and tokenised per tokenizer call
PARQUET_BATCH_ROWS = 4096  # rows per record batch read from a pre-tokenised Parquet file
STORE_FORMAT = "refteacher.packed-rows/1"
_WRITE_TOKENS = 1 << 18  # tokens of packed rows buffered before a write to the store's files
# file name -> dtype: the flat arrays of a PackedRowStore
_STORE_FILES = {
    "input_ids": np.int32,  # [T] token ids of every row, row after row
    "labels": np.int32,  # [T] the rows' labels (-100 where no loss is taken)
    "row_offsets": np.int64,  # [R + 1] row r is tokens row_offsets[r]:row_offsets[r + 1]
    "segment_offsets": np.int64,  # [R + 1] row r holds sequences segment_offsets[r]:segment_offsets[r + 1]
    "segment_lengths": np.int32,  # [S] tokens of each sequence (example) in its row
    "example_index": np.int64,  # [S] which kept example each sequence is
}


@dataclass
class EncodeStats:
    """What a pass over a dataset saw: rows read, examples kept, rows dropped for lack of labels."""

    rows: int = 0
    examples: int = 0
    dropped: int = 0


# --------------------------------------------------------------------------------------------
# The stream: records -> token ids with response labels -> packed rows
# --------------------------------------------------------------------------------------------


def encoded_examples(
    tokenizer, records: Iterable[tuple[int, dict[str, Any]]], max_len: int, *, where: str = "data",
    stats: EncodeStats | None = None, batch_rows: int | None = None,
) -> Iterator[tuple[list[int], list[int]]]:
    """Yield ``(input_ids, labels)`` (int lists, at most ``max_len`` long) for ``(row id, record)`` pairs.

    Rows are rendered with the chat template and tokenised ``batch_rows`` (default
    ``ENCODE_BATCH_ROWS``) at a time. A row with no
    label after its first token (its response cut off by ``max_len``) is dropped and counted in
    ``stats``. UserError naming the row id for a row that is not a training row.
    """
    stats = stats if stats is not None else EncodeStats()
    batch_rows = batch_rows or ENCODE_BATCH_ROWS
    iterator = iter(records)
    while batch := list(islice(iterator, batch_rows)):
        pieces = []
        for row_id, record in batch:
            try:
                pieces.append(chat_pieces(tokenizer, record))
            except UserError as err:
                raise UserError(f"{where} row {row_id}: {err}") from None
        stats.rows += len(batch)
        for ids, labels in encode_pieces(tokenizer, pieces, max_tokens=max_len):
            if not any(label != IGNORE_INDEX for label in labels[1:]):
                stats.dropped += 1
                continue
            stats.examples += 1
            yield ids, labels


def pack_records(
    tokenizer, records: Iterable[tuple[int, dict[str, Any]]], max_len: int, *, where: str = "data",
    stats: EncodeStats | None = None,
) -> Iterator[PackedRow]:
    """Stream ``(row id, record)`` pairs into ``PackedRow``s of at most ``max_len`` tokens.

    ``encoded_examples`` feeds ``pack_sequences`` (best-fit-decreasing over a window of
    ``DEFAULT_WINDOW`` examples); ``example_index`` counts the kept examples in input order.
    """
    examples = encoded_examples(tokenizer, records, max_len, where=where, stats=stats)
    return pack_sequences(examples, max_len, overflow="truncate")


def is_pretokenised(source) -> bool:
    """True for a Parquet source with an ``input_ids`` column: rows tokenised already."""
    return source.fmt == "parquet" and "input_ids" in pq.ParquetFile(source.location).schema_arrow.names


def pack_tokenised_parquet(tokenizer, path: str | os.PathLike, max_len: int, *, where: str = "data",
                           stats: EncodeStats | None = None) -> Iterator[PackedRow]:
    """Stream a Parquet file of tokenised rows into ``PackedRow``s, reading its Arrow columns in place.

    Columns: ``input_ids`` (``list<int>``) and optional ``labels`` (``list<int>``, -100 where no
    loss is taken, else the token id; without it every token takes loss). Record batches of
    ``PARQUET_BATCH_ROWS`` rows go to ``pack_arrow`` as they are read (values and offsets as numpy
    views, no row decoded in Python); rows longer than ``max_len`` are cut to their first
    ``max_len`` tokens. UserError for ids outside the tokenizer's vocabulary or any row the packer
    rejects (example i is the file's row i + 1).
    """
    stats = stats if stats is not None else EncodeStats()
    parquet = pq.ParquetFile(path)
    columns = [name for name in ("input_ids", "labels") if name in parquet.schema_arrow.names]
    vocab = len(tokenizer)

    def batches() -> Iterator[Any]:
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
            top = pc.max(pc.list_flatten(batch.column("input_ids"))).as_py() if batch.num_rows else None
            if top is not None and top >= vocab:
                raise UserError(f"token id {top} in rows {stats.rows + 1}-{stats.rows + batch.num_rows} is outside "
                                f"the tokenizer's vocabulary ({vocab}); tokenise with the student's tokenizer")
            stats.rows += batch.num_rows
            stats.examples += batch.num_rows
            yield batch

    ids_batches, label_batches = tee(batches())
    try:
        yield from pack_arrow((b.column("input_ids") for b in ids_batches), max_len,
                              labels=(b.column("labels") for b in label_batches) if "labels" in columns else None,
                              overflow="truncate")
    except UserError as err:
        hint = " (example i is row i + 1 of the file)" if str(err).startswith("example") else ""
        raise UserError(f"{where}: {err}{hint}") from None


# --------------------------------------------------------------------------------------------
# The store: packed rows in flat files, read back through memory maps
# --------------------------------------------------------------------------------------------


class PackedRowStore(Sequence[PackedRow]):
    """Packed rows kept on disk (``_STORE_FILES`` under ``folder``), read through memory maps.

    ``store[i]`` is row i as a ``PackedRow`` (int64 input_ids, labels, position_ids [n]; int32
    cu_seqlens [k + 1]; int64 example_index [k]), built from the maps on each access; ``manifest``
    holds the counts and what the rows were built from.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.manifest = json.loads((self.folder / "manifest.json").read_text())
        self._arrays = {name: _map(self.folder / f"{name}.bin", dtype) for name, dtype in _STORE_FILES.items()}

    def __len__(self) -> int:
        return int(self.manifest["packed_rows"])

    def __getstate__(self) -> dict[str, Any]:  # a DataLoader worker re-opens the maps, not a copy of the data
        return {"folder": str(self.folder)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["folder"])

    def __getitem__(self, index: int) -> PackedRow:  # type: ignore[override]
        if isinstance(index, slice):
            raise TypeError("PackedRowStore takes one row index at a time")
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"row {index} out of range for {n} packed rows")
        a = self._arrays
        t0, t1 = (int(x) for x in a["row_offsets"][index : index + 2])
        s0, s1 = (int(x) for x in a["segment_offsets"][index : index + 2])
        lengths = np.asarray(a["segment_lengths"][s0:s1], dtype=np.int32)
        cu_seqlens = np.zeros(lengths.shape[0] + 1, dtype=np.int32)
        np.cumsum(lengths, out=cu_seqlens[1:])
        starts = np.repeat(cu_seqlens[:-1].astype(np.int64), lengths)
        return PackedRow(
            input_ids=np.asarray(a["input_ids"][t0:t1], dtype=np.int64),
            labels=np.asarray(a["labels"][t0:t1], dtype=np.int64),
            position_ids=np.arange(t1 - t0, dtype=np.int64) - starts,
            cu_seqlens=cu_seqlens,
            example_index=np.asarray(a["example_index"][s0:s1], dtype=np.int64),
        )


def _map(path: Path, dtype) -> np.ndarray:
    """A read-only memory map of a flat binary file (an empty array for an empty file)."""
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def _tokenizer_identity(tokenizer) -> dict[str, Any]:
    """What decides the token ids: the tokenizer's name, class, vocabulary size and chat template."""
    template = getattr(tokenizer, "chat_template", None) or ""
    return {"name": str(getattr(tokenizer, "name_or_path", "")), "class": type(tokenizer).__name__,
            "vocab": len(tokenizer), "chat_template_sha256": hashlib.sha256(str(template).encode()).hexdigest()}


def build_packed_rows(tokenizer, location: str | os.PathLike, max_len: int, folder: str | os.PathLike,
                      *, where: str | None = None) -> PackedRowStore:
    """Pack the training rows of ``location`` (JSONL / CSV / Parquet / ``hf:NAME``) into a store at ``folder``.

    Streams ``read_records`` -> ``pack_records`` -> flat files (a Parquet file with an
    ``input_ids`` column: ``pack_tokenised_parquet`` instead, no tokenisation), buffering ``_WRITE_TOKENS`` tokens of
    rows at a time; writes into a temporary folder renamed into place when complete, so an interrupted build
    never leaves a store that looks whole. Reuses an existing store built from the same input
    (path, size, mtime or HF name), tokenizer and settings. UserError for a bad row (naming its
    id) or when no row has response tokens within ``max_len``.
    """
    where = where or str(location)
    folder = Path(folder)
    source = open_source(location)
    settings = {"format": STORE_FORMAT, "source": source.fingerprint(), "tokenizer": _tokenizer_identity(tokenizer),
                "max_len": int(max_len), "window": DEFAULT_WINDOW, "max_open": DEFAULT_MAX_OPEN,
                "overflow": "truncate"}
    existing = _open_matching(folder, settings)
    if existing is not None:
        log.info("%s: reusing %d packed rows in %s", where, len(existing), folder)
        return existing
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        stats = EncodeStats()
        if is_pretokenised(source):
            packed = pack_tokenised_parquet(tokenizer, source.location, max_len, where=where, stats=stats)
        else:
            packed = pack_records(tokenizer, read_records(location), max_len, where=where, stats=stats)
        rows, tokens = _write_rows(packed, tmp)
        if stats.dropped:
            log.warning("%s: %d rows had no response tokens within %d tokens and were dropped", where, stats.dropped,
                        max_len)
        if stats.rows == 0:
            raise UserError(f"{where} holds no rows to train on")
        if stats.examples == 0:
            raise UserError(f"{where}: no row has response tokens within --max-len {max_len}; raise --max-len")
        manifest = settings | asdict(stats) | {"packed_rows": rows, "tokens": tokens}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        existing = _open_matching(folder, settings)  # another process may have finished first
        if existing is not None:
            return existing
        shutil.rmtree(folder, ignore_errors=True)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process put a store there meanwhile: use it if it is the same
            existing = _open_matching(folder, settings)
            if existing is None:
                raise
            return existing
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return PackedRowStore(folder)


def _open_matching(folder: Path, settings: dict[str, Any]) -> PackedRowStore | None:
    """The store at ``folder`` when it is complete and was built with ``settings``, else None."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if any(manifest.get(key) != value for key, value in settings.items()):
        return None
    return PackedRowStore(folder)


def _write_rows(rows: Iterable[PackedRow], folder: Path) -> tuple[int, int]:
    """Append ``rows`` to the store files in ``folder``; return (rows, tokens) written."""
    files = {name: open(folder / f"{name}.bin", "wb") for name in _STORE_FILES}
    n_rows = n_tokens = n_segments = 0
    try:
        np.zeros(1, dtype=np.int64).tofile(files["row_offsets"])
        np.zeros(1, dtype=np.int64).tofile(files["segment_offsets"])
        batch: list[PackedRow] = []
        buffered = 0

        def flush() -> None:
            nonlocal n_tokens, n_segments, buffered
            if not batch:
                return
            tokens = np.array([r.num_tokens for r in batch], dtype=np.int64)
            segments = np.array([r.example_index.shape[0] for r in batch], dtype=np.int64)
            np.concatenate([r.input_ids for r in batch]).astype(np.int32).tofile(files["input_ids"])
            np.concatenate([r.labels for r in batch]).astype(np.int32).tofile(files["labels"])
            (n_tokens + np.cumsum(tokens)).tofile(files["row_offsets"])
            (n_segments + np.cumsum(segments)).tofile(files["segment_offsets"])
            np.concatenate([np.diff(r.cu_seqlens) for r in batch]).astype(np.int32).tofile(files["segment_lengths"])
            np.concatenate([r.example_index for r in batch]).tofile(files["example_index"])
            n_tokens += int(tokens.sum())
            n_segments += int(segments.sum())
            batch.clear()
            buffered = 0

        for row in rows:
            batch.append(row)
            n_rows += 1
            buffered += row.num_tokens
            if buffered >= _WRITE_TOKENS:
                flush()
        flush()
    finally:
        for f in files.values():
            f.close()
    return n_rows, n_tokens


# --------------------------------------------------------------------------------------------
# Training items: a task row paired with an alignment row
# --------------------------------------------------------------------------------------------


class PairedRows(torch.utils.data.Dataset):
    """Dataset item i = {"task": task_rows[i % T], "align": align_rows[i % A] or None}, of length max(T, A).

    An epoch covers every task row and every alignment row at least once: the shorter list is
    cycled. (Pairing only the first T alignment rows would leave some unseen, and the packer
    orders rows by length, so the unseen ones would be the short refusals, not a random share.)
    ``task_rows`` and ``align_rows`` are any sequences of ``PackedRow`` (lists,
    ``PackedRowStore``s), used as they are, not copied.
    """

    def __init__(self, task_rows: Sequence[PackedRow], align_rows: Sequence[PackedRow] | None = None):
        if len(task_rows) == 0:
            raise UserError("no packed training rows; the data is empty")
        self.task_rows = task_rows
        self.align_rows = align_rows if align_rows is not None and len(align_rows) > 0 else []

    def __len__(self) -> int:
        return max(len(self.task_rows), len(self.align_rows))

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        align = self.align_rows[index % len(self.align_rows)] if len(self.align_rows) else None
        return {"task": self.task_rows[index % len(self.task_rows)], "align": align}


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
