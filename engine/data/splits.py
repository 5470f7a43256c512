"""A source read in independent parts (splits), with the row ids a whole read gives its rows.

What a cluster reads side by side (the Ray engine, ``filter/ray_engine.py``). A split is a
contiguous run of a source's rows:

- JSONL: a byte range that starts at a line. The planner counts the newlines before each cut (one
  pass of ``bytes.count`` over the file), so every row keeps its line number as its id. A gzip
  file is one split (a gzip stream cannot be entered in the middle).
- Parquet: a run of row groups; row counts come from the file's metadata, so ids are exact.

A split is read as Arrow tables of at most ``block_rows`` rows with the columns ``ID_COLUMN`` and
``LINE_COLUMN``, plus the line's bytes in ``RAW_COLUMN`` (JSONL) or the file's own columns
(Parquet). ``raw_rows`` turns such a table back into ``RawRow``s, which ``readers.parse_row``
reads exactly as in a whole read, so both engines accept and reject the same rows.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from refteacher.engine.data.readers import RawRow, Source, _open_binary, jsonl_lines
from refteacher.engine.errors import UserError

ID_COLUMN = "__refteacher_id"
LINE_COLUMN = "__refteacher_line"
RAW_COLUMN = "__refteacher_raw"
INTERNAL_COLUMNS = (ID_COLUMN, LINE_COLUMN, RAW_COLUMN)
SPLIT_FORMATS = ("jsonl", "parquet")
MIN_SPLIT_BYTES = 1 << 20  # smaller JSONL parts are not worth a task of their own
_SCAN_CHUNK = 1 << 24


@dataclass(frozen=True)
class Split:
    """Rows ``start`` .. ``stop`` (exclusive) of a source: bytes for JSONL, row groups for Parquet.

    ``first_id`` is the id of the split's first row (for JSONL, the line number its range starts
    on); ``size_bytes`` is its size on disk; ``rows`` its row count where known (Parquet).
    """

    start: int
    stop: int
    first_id: int
    size_bytes: int
    rows: int | None = None


def plan_splits(source: Source, parts: int) -> list[Split]:
    """Cut ``source`` into about ``parts`` splits, in input order; UserError for a format that cannot be split."""
    if source.fmt not in SPLIT_FORMATS:
        raise UserError(f"reading {source.fmt} input in parts is not supported; pass JSONL or Parquet "
                        "(or convert the file)")
    parts = max(1, parts)
    if source.fmt == "parquet":
        return _parquet_splits(source.location, parts)
    size = os.path.getsize(source.location)
    if _gzipped(source):
        return [Split(0, size, 1, size)]
    return _jsonl_splits(source.location, size, parts)


def _jsonl_splits(path: str, size: int, parts: int) -> list[Split]:
    """Byte ranges of about size/parts bytes, each cut just after a newline, with their first line number."""
    step = max(MIN_SPLIT_BYTES, -(-size // parts))
    splits: list[Split] = []
    start, first_line = 0, 1
    offset, newlines = 0, 0  # the chunk's offset in the file, and the newlines before it
    target = step
    with open(path, "rb") as f:
        while target < size:
            chunk = f.read(_SCAN_CHUNK)
            if not chunk:
                break
            while target < offset + len(chunk):
                end = chunk.find(b"\n", max(target, offset) - offset)
                if end < 0:
                    break
                cut = offset + end + 1
                line = 1 + newlines + chunk.count(b"\n", 0, end + 1)
                if cut < size:
                    splits.append(Split(start, cut, first_line, cut - start))
                    start, first_line = cut, line
                target = cut + step
            newlines += chunk.count(b"\n")
            offset += len(chunk)
    splits.append(Split(start, size, first_line, size - start))
    return splits


def _parquet_splits(path: str, parts: int) -> list[Split]:
    """Runs of whole row groups of about total/parts rows each."""
    try:
        metadata = pq.ParquetFile(path).metadata
    except Exception as err:  # pyarrow raises its own error types for corrupt files
        raise UserError(f"{path} is not a readable Parquet file ({err})") from None
    groups = [(metadata.row_group(g).num_rows, metadata.row_group(g).total_byte_size)
              for g in range(metadata.num_row_groups)]
    per_split = max(1, -(-metadata.num_rows // parts))
    splits: list[Split] = []
    start, first_id, rows, size = 0, 1, 0, 0
    for group, (group_rows, group_bytes) in enumerate(groups):
        rows += group_rows
        size += group_bytes
        if rows >= per_split or group == len(groups) - 1:
            splits.append(Split(start, group + 1, first_id, size, rows))
            start, first_id, rows, size = group + 1, first_id + rows, 0, 0
    return splits or [Split(0, 0, 1, 0, 0)]


def row_bytes(source: Source) -> float:
    """About how many bytes a row of ``source`` takes (for sizing blocks): from the Parquet metadata,
    or the first MiB of a JSONL file."""
    if source.fmt == "parquet":
        metadata = pq.ParquetFile(source.location).metadata
        size = sum(metadata.row_group(g).total_byte_size for g in range(metadata.num_row_groups))
        return size / max(1, metadata.num_rows)
    with _open_binary(source.location) as f:
        sample = f.read(MIN_SPLIT_BYTES)
    return len(sample) / max(1, sample.count(b"\n"))


def read_split(source: Source, split: Split, block_rows: int) -> Iterator[pa.Table]:
    """Yield the rows of ``split`` as Arrow tables of at most ``block_rows`` rows (see module doc)."""
    if source.fmt == "parquet":
        yield from _parquet_blocks(source.location, split, block_rows)
        return
    with _open_binary(source.location) as f:
        ids: list[int] = []
        raws: list[bytes] = []
        lines = f if _gzipped(source) else _lines_between(f, split.start, split.stop)
        for line_number, line in jsonl_lines(lines, source.location, first_line=split.first_id):
            ids.append(line_number)
            raws.append(line)
            if len(ids) == block_rows:
                yield _jsonl_block(ids, raws)
                ids, raws = [], []
        if ids:
            yield _jsonl_block(ids, raws)


def _gzipped(source: Source) -> bool:
    return source.location.lower().endswith(".gz")


def _lines_between(f, start: int, stop: int) -> Iterator[bytes]:
    """The lines of binary file ``f`` from byte ``start`` (a line start) up to byte ``stop``."""
    if start:
        f.seek(start)
    position = start
    for line in f:
        if position >= stop:
            return
        yield line
        position += len(line)


def _jsonl_block(ids: list[int], raws: list[bytes]) -> pa.Table:
    id_array = pa.array(ids, pa.int64())
    return pa.table({ID_COLUMN: id_array, LINE_COLUMN: id_array, RAW_COLUMN: pa.array(raws, pa.binary())})


def _parquet_blocks(path: str, split: Split, block_rows: int) -> Iterator[pa.Table]:
    parquet = pq.ParquetFile(path)
    next_id = split.first_id
    for batch in parquet.iter_batches(batch_size=block_rows, row_groups=list(range(split.start, split.stop))):
        ids = pa.array(range(next_id, next_id + batch.num_rows), pa.int64())
        next_id += batch.num_rows
        yield pa.Table.from_batches([batch]).append_column(ID_COLUMN, ids).append_column(LINE_COLUMN, ids)


def record_columns(table: pa.Table) -> pa.Table:
    """``table`` without the split's own columns: the rows as the source holds them."""
    return table.drop_columns([name for name in INTERNAL_COLUMNS if name in table.column_names])


def raw_rows(table: pa.Table) -> list[RawRow]:
    """The rows of a table from ``read_split`` as RawRow (ordinal -1: not known within a split).

    A table without ``ID_COLUMN`` (a dataset from elsewhere) gives ids 1..N in table order, and its
    records are its rows.
    """
    count = table.num_rows
    ids = table.column(ID_COLUMN).to_pylist() if ID_COLUMN in table.column_names else list(range(1, count + 1))
    lines = table.column(LINE_COLUMN).to_pylist() if LINE_COLUMN in table.column_names else ids
    if RAW_COLUMN in table.column_names:
        payloads = table.column(RAW_COLUMN).to_pylist()
    else:
        payloads = record_columns(table).to_pylist()
    return [RawRow(-1, row_id, line, payload) for row_id, line, payload in zip(ids, lines, payloads)]
