"""Sequence packing for padding-free finetuning: many examples per row, no padding inside a row.

Three front doors stream examples through the compiled best-fit-decreasing packer
(``refteacher.engine.data._packer``, algorithm documented at the top of csrc/packer.cpp and mirrored
in ``refteacher.engine.data.packing_reference``) and yield ``PackedRow`` objects as soon as rows are
decided: ``pack_sequences`` (one sequence, pair or dict per example), ``pack_token_chunks`` (flat
numpy ids + offsets) and ``pack_arrow`` (a tokenised Arrow list column, read without copying).
Every per-example check (empty, not integers, ids outside [0, 2**31 - 1], labels that do not match
the ids, too long for ``overflow="error"``) runs in C++ and surfaces as a ``UserError`` naming the
example. ``collate_packed`` turns a list of rows into the torch tensors of one training step.

Row conventions (the same for the C++ packer and the Python reference):

- A row is exactly as long as its tokens (at most ``max_len``); it is *not* padded. ``collate_packed``
  pads when it stacks rows.
- ``position_ids`` restart at 0 for every example; ``cu_seqlens`` (int32) are the example boundaries
  inside the row, from 0 to the row's length.
- ``labels`` follow the Hugging Face convention (unshifted; the model shifts): the token id where loss
  is taken, else -100. The first token of every example is always -100, so that under the shift the
  last token of one example is never trained to predict the first token of the next.
- ``example_index`` lists the input examples in the row, in the order their tokens appear (the order
  the packer placed them, not sorted). With ``overflow="split"`` a long example appears in several rows.
- Token ids must lie in [0, 2**31 - 1] (the compiled packer holds pending ids as int32); the row
  arrays are still int64 (``input_ids``, ``labels``, ``position_ids``, ``example_index``) and int32
  (``cu_seqlens``). The rows of one ``pop_ready`` batch are views into shared flat arrays, whose
  memory the packer reuses for later rows once every view of them is gone.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import islice
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from refteacher.engine.data import _packer
from refteacher.engine.data.chat_examples import IGNORE_INDEX
from refteacher.engine.errors import UserError

OVERFLOW_MODES = ("error", "truncate", "split")
DEFAULT_WINDOW = 1000
DEFAULT_MAX_OPEN = 64
_LIST_EXAMPLES = 256  # examples per add_list call
_BATCH_TOKENS = 65536  # tokens per add_many call: small enough for the packer's buffers to stay in cache


@dataclass(frozen=True, eq=False, slots=True)
class PackedRow:
    """One packed row: int64 ``input_ids``/``labels``/``position_ids`` of shape [n], int32
    ``cu_seqlens`` of shape [k + 1] (0 ... n) and int64 ``example_index`` of shape [k]."""

    input_ids: np.ndarray
    labels: np.ndarray
    position_ids: np.ndarray
    cu_seqlens: np.ndarray
    example_index: np.ndarray

    @property
    def num_tokens(self) -> int:
        """Real tokens in the row."""
        return int(self.input_ids.shape[0])

    @property
    def max_seqlen(self) -> int:
        """Length of the longest example in the row."""
        return int(np.diff(self.cu_seqlens).max())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PackedRow):
            return NotImplemented
        return all(
            a.dtype == b.dtype and np.array_equal(a, b)
            for a, b in zip(self._arrays(), other._arrays())
        )

    def _arrays(self) -> tuple[np.ndarray, ...]:
        return (self.input_ids, self.labels, self.position_ids, self.cu_seqlens, self.example_index)


def check_pack_args(max_len: Any, window: Any, overflow: Any, max_open: Any) -> None:
    """Raise ``UserError`` unless max_len, window, max_open are positive ints and overflow is known."""
    for name, value in (("max_len", max_len), ("window", window), ("max_open", max_open)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise UserError(f"{name} must be an integer >= 1, got {value!r}")
    if max_len > np.iinfo(np.int32).max:
        raise UserError(f"max_len must fit in int32, got {max_len}")
    if overflow not in OVERFLOW_MODES:
        raise UserError(f"overflow must be one of {OVERFLOW_MODES}, got {overflow!r}")


def rows_from_ready(ready: tuple[np.ndarray, ...]) -> list[PackedRow]:
    """Split the flat arrays of ``Packer.pop_ready()`` into ``PackedRow`` objects (views, no copies).

    ``ready`` is (input_ids int64 [T], labels int64 [T], position_ids int64 [T], row_offsets int64
    [R + 1], cu_seqlens int32 [S + R], example_index int64 [S], row_segment_offsets int64 [R + 1]);
    returns R rows. Runs once per packed row, so it fills the row's slots directly instead of going
    through the frozen dataclass's ``__init__`` (about 1.3 us a row instead of 3).
    """
    ids, labels, positions, row_offsets, cu_flat, examples, seg_offsets = ready
    token_bounds = row_offsets.tolist()
    segment_bounds = seg_offsets.tolist()
    rows: list[PackedRow] = []
    append = rows.append
    new_row = object.__new__
    set_ids, set_labels, set_positions, set_cu, set_examples = _SLOT_SETTERS
    for r, (a, b, s, t) in enumerate(zip(token_bounds, token_bounds[1:], segment_bounds, segment_bounds[1:])):
        row = new_row(PackedRow)
        set_ids(row, ids[a:b])
        set_labels(row, labels[a:b])
        set_positions(row, positions[a:b])
        set_cu(row, cu_flat[s + r : t + r + 1])
        set_examples(row, examples[s:t])
        append(row)
    return rows


# The slot descriptors of PackedRow's fields, in field order (they write past the frozen __setattr__).
_SLOT_SETTERS = tuple(
    getattr(PackedRow, name).__set__
    for name in ("input_ids", "labels", "position_ids", "cu_seqlens", "example_index")
)


def _new_packer(max_len: int, window: int, overflow: str, max_open: int):
    return _packer.Packer(int(max_len), int(window), overflow, int(max_open))


def _call(fn, *args, **kwargs) -> None:
    try:
        fn(*args, **kwargs)
    except ValueError as exc:  # the C++ side raises ValueError with a how-to-fix message
        raise UserError(str(exc)) from None


def pack_sequences(
    examples: Iterable[Any],
    max_len: int,
    window: int = DEFAULT_WINDOW,
    overflow: str = "error",
    max_open: int = DEFAULT_MAX_OPEN,
) -> Iterator[PackedRow]:
    """Pack ``examples`` into rows of at most ``max_len`` tokens; return an iterator of ``PackedRow``.

    ``examples``: any iterable; each example is a 1-D integer sequence (numpy array of any integer
    dtype, list or tuple of ints, or anything numpy turns into one), an ``(input_ids, labels)``
    pair, or a dict with ``input_ids`` and optional ``labels`` (the token id where loss is taken,
    -100 elsewhere; unshifted). Token ids must lie in [0, 2**31 - 1]. ``window``: examples held back
    to choose from (best-fit-decreasing over the window); ``max_open``: rows kept open at once.
    ``overflow`` for an example longer than ``max_len``: "error" (UserError naming its index),
    "truncate" (keep the first ``max_len`` tokens) or "split" (consecutive pieces of ``max_len``,
    each its own sequence). Examples are handed to the compiled packer in lists of
    ``_LIST_EXAMPLES``, which checks them (UserError naming the first bad example: empty, not
    integers, not 1-D, ids out of range, labels of the wrong length or not matching the ids) and
    reads numpy arrays in place; memory is bounded by window, list and open rows. Arguments are
    checked at once; examples as the iterator is consumed.
    """
    check_pack_args(max_len, window, overflow, max_open)
    packer = _new_packer(max_len, window, overflow, max_open)

    def stream() -> Iterator[PackedRow]:
        iterator = iter(examples)
        while chunk := list(islice(iterator, _LIST_EXAMPLES)):
            _call(packer.add_list, chunk)
            del chunk
            yield from rows_from_ready(packer.pop_ready())
        _call(packer.flush)
        yield from rows_from_ready(packer.pop_ready())

    return stream()


def _add_in_batches(
    packer,
    flat_ids: np.ndarray,
    offsets: np.ndarray,
    mask: np.ndarray | None = None,
    labels: tuple[np.ndarray, np.ndarray] | None = None,
) -> Iterator[PackedRow]:
    """Add one chunk in consecutive slices of about ``_BATCH_TOKENS`` tokens, yielding the rows each
    slice decides.

    ``flat_ids`` [T] integers, ``offsets`` [n + 1] int32 or int64 (example i is
    ``flat_ids[offsets[i]:offsets[i+1]]``), ``mask`` [T] bool or None, ``labels`` None or
    ``(flat_labels, label_offsets)`` (Arrow layout: example i's labels are
    ``flat_labels[label_offsets[i]:label_offsets[i+1]]``). Nothing is copied: slices of the offsets
    are views. Same rows as one ``add_many`` of the whole chunk (the packer sees the same examples
    in the same order); small slices keep the output blocks, which the packer recycles as rows are
    dropped, in cache (see benchmarks/bench_packing.py).
    """
    n = offsets.shape[0] - 1
    cuts = [0, n]
    if n > 1 and int(offsets[-1]) - int(offsets[0]) > _BATCH_TOKENS:
        targets = np.arange(int(offsets[0]) + _BATCH_TOKENS, int(offsets[-1]), _BATCH_TOKENS)
        inner = np.clip(np.searchsorted(offsets, targets, side="right"), 1, n)
        # Monotone even if offsets are not (add_many rejects those); every example in one slice.
        cuts = [0, *np.maximum.accumulate(inner).tolist(), n]
    for lo, hi in zip(cuts, cuts[1:]):
        if hi > lo or n == 0:
            if labels is None:
                _call(packer.add_many, flat_ids, offsets[lo : hi + 1], mask)
            else:
                _call(packer.add_many, flat_ids, offsets[lo : hi + 1], None,
                      flat_labels=labels[0], label_offsets=labels[1][lo : hi + 1])
            yield from rows_from_ready(packer.pop_ready())


def pack_token_chunks(
    chunks: Iterable[tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, np.ndarray | None]],
    max_len: int,
    window: int = DEFAULT_WINDOW,
    overflow: str = "error",
    max_open: int = DEFAULT_MAX_OPEN,
) -> Iterator[PackedRow]:
    """``pack_sequences`` for data already in flat numpy form (the layout of an Arrow list column).

    Each chunk is ``(flat_ids, offsets)`` or ``(flat_ids, offsets, flat_label_mask)``: integer ids
    [T] of any integer dtype (read in place, not copied or cast), int32 or int64 offsets [n + 1]
    (example i is ``flat_ids[offsets[i]:offsets[i+1]]``; read in place) and an optional bool mask
    [T] (True = loss). Example indices count across chunks. Same rows as ``pack_sequences`` on the
    same examples, and the same checks (UserError naming the example), done in C++.
    """
    check_pack_args(max_len, window, overflow, max_open)
    packer = _new_packer(max_len, window, overflow, max_open)

    def stream() -> Iterator[PackedRow]:
        for chunk in chunks:
            flat_ids, offsets = chunk[0], _offsets_array(chunk[1])
            mask = chunk[2] if len(chunk) > 2 else None
            yield from _add_in_batches(packer, np.asarray(flat_ids), offsets, mask)
        _call(packer.flush)
        yield from rows_from_ready(packer.pop_ready())

    return stream()


def _offsets_array(offsets: Any) -> np.ndarray:
    """Offsets as a 1-D int32/int64 array (a view when they are one already)."""
    array = np.asarray(offsets)
    if array.ndim != 1 or array.shape[0] < 1 or (array.size and array.dtype.kind not in "iu"):
        raise UserError("offsets must be a 1-D integer array of n + 1 positions for n examples")
    if array.dtype not in (np.int32, np.int64):
        array = array.astype(np.int64)
    return array


def pack_arrow(
    input_ids: Any,
    max_len: int,
    labels: Any = None,
    window: int = DEFAULT_WINDOW,
    overflow: str = "error",
    max_open: int = DEFAULT_MAX_OPEN,
) -> Iterator[PackedRow]:
    """Pack a tokenised Arrow list column without copying it; same rows as ``pack_sequences``.

    ``input_ids``: a ``pyarrow`` ``ListArray`` or ``LargeListArray`` of integers (``list<int32>``,
    ``large_list<int64>``, any integer type), a ``ChunkedArray`` of them (a ``Table`` column, e.g.
    ``datasets.Dataset.data.column("input_ids")``), or an iterable of either (say the column of each
    record batch streamed from a Parquet file), read one chunk at a time. Each chunk's values and
    offsets (int32, or int64 for large lists) go to the packer as numpy views of the Arrow buffers.
    ``labels``: None, or a column of the same shape (``list<int>``, -100 where no loss is taken, else
    the token id), row-aligned with ``input_ids`` whatever its chunking. Null rows, null token ids,
    non-integer values and every per-example check of ``pack_sequences`` raise UserError naming the
    example (its index in the whole column).
    """
    check_pack_args(max_len, window, overflow, max_open)
    packer = _new_packer(max_len, window, overflow, max_open)

    def stream() -> Iterator[PackedRow]:
        index = 0
        for ids_part, labels_part in _aligned_chunks(input_ids, labels):
            values, offsets = _list_buffers(ids_part, "input_ids", index)
            label_buffers = None if labels_part is None else _list_buffers(labels_part, "labels", index)
            yield from _add_in_batches(packer, values, offsets, labels=label_buffers)
            index += len(ids_part)
        _call(packer.flush)
        yield from rows_from_ready(packer.pop_ready())

    return stream()


def _arrow_arrays(column: Any, what: str) -> Iterator[Any]:
    """The Arrow arrays of ``column`` (an Array, a ChunkedArray, or an iterable of either), in order."""
    import pyarrow as pa

    if isinstance(column, pa.ChunkedArray):
        yield from column.chunks
    elif isinstance(column, pa.Array):
        yield column
    elif isinstance(column, (pa.Table, pa.RecordBatch)):
        raise UserError(f"{what}: pass one column (table.column({what!r})), not a whole table")
    elif isinstance(column, Iterable) and not isinstance(column, (str, bytes)):
        for part in column:
            if not isinstance(part, (pa.Array, pa.ChunkedArray)):
                raise UserError(f"{what}: expected Arrow arrays, got {type(part).__name__}")
            yield from _arrow_arrays(part, what)
    else:
        raise UserError(f"{what} must be an Arrow list column (pyarrow Array or ChunkedArray), "
                        f"got {type(column).__name__}")


def _aligned_chunks(input_ids: Any, labels: Any) -> Iterator[tuple[Any, Any]]:
    """Pairs (ids array, labels array or None) over the same rows, cut where either column's chunks
    end (slices of Arrow arrays: no copy). UserError when the columns have different lengths."""
    if labels is None:
        for part in _arrow_arrays(input_ids, "input_ids"):
            yield part, None
        return
    label_parts = _arrow_arrays(labels, "labels")
    pending = None
    for ids in _arrow_arrays(input_ids, "input_ids"):
        while len(ids):
            if pending is None or not len(pending):
                pending = next(label_parts, None)
                if pending is None:
                    raise UserError("labels have fewer rows than input_ids; give one labels list per example")
                continue
            take = min(len(ids), len(pending))
            yield ids.slice(0, take), pending.slice(0, take)
            ids, pending = ids.slice(take), pending.slice(take)
    if (pending is not None and len(pending)) or any(len(part) for part in label_parts):
        raise UserError("labels have more rows than input_ids; give one labels list per example")


def _list_buffers(array: Any, what: str, first_example: int) -> tuple[np.ndarray, np.ndarray]:
    """(values [V], offsets [n + 1]) of an Arrow list array as numpy views of its buffers.

    ``offsets`` are int32 (``list``) or int64 (``large_list``) and index ``values`` directly (a
    sliced array keeps its place in the shared values). UserError for a non-list or non-integer
    type, a null row (naming its example index) or null values.
    """
    import pyarrow as pa

    kind = array.type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)):
        raise UserError(f"{what} must be an Arrow list column (list<int> or large_list<int>), got {kind}")
    if not pa.types.is_integer(kind.value_type):
        raise UserError(f"{what} must hold integers, got {kind}")
    if array.null_count:
        row = int(np.flatnonzero(array.is_null().to_numpy(zero_copy_only=False))[0])
        raise UserError(f"example {first_example + row}: {what} is null; drop null rows before packing")
    try:
        values = array.values.to_numpy(zero_copy_only=True)
    except pa.ArrowInvalid:
        raise UserError(f"{what} hold null values; every token must be an integer") from None
    return values, array.offsets.to_numpy(zero_copy_only=True)


def packing_efficiency(rows: Sequence[PackedRow], max_len: int) -> float:
    """Real tokens divided by row capacity (``len(rows) * max_len``); 1.0 means no padding at all."""
    if not rows:
        return 1.0
    return sum(r.num_tokens for r in rows) / (len(rows) * max_len)


def collate_packed(
    rows: Sequence[PackedRow], pad_token_id: int = 0, flatten: bool = False
) -> dict[str, Any]:
    """Stack packed rows into the tensors of one training step.

    Default (``flatten=False``): ``input_ids``, ``labels``, ``position_ids`` of shape [R, L] (int64),
    L the longest row; the padding after a row's tokens holds ``pad_token_id``, labels -100 and
    positions 0, 1, 2, ... (the padding forms its own dummy sequence, so no real token sees it).
    ``flatten=True``: the rows are concatenated into shape [1, T] with no padding at all (the layout
    of transformers' ``DataCollatorWithFlattening``).

    Both also carry ``cu_seqlens`` (int32 [S + 1], the sequence boundaries over the flattened
    ``input_ids.view(-1)``, padding runs included as their own sequences) and ``max_seqlen`` (int),
    plus the same under the names transformers' flash-attention path reads (``cu_seq_lens_q``,
    ``cu_seq_lens_k``, ``max_length_q``, ``max_length_k``) and ``num_real_tokens`` (int).
    Call the model with ``position_ids``, ``use_cache=False`` and no ``attention_mask``: transformers
    then finds the sequence boundaries from ``position_ids`` and keeps attention inside each example
    (sdpa/eager and flash-attention alike). With a cache (``use_cache`` defaults to True) or an
    attention mask it does not, and examples in one row would attend to each other.
    """
    if not rows:
        raise UserError("collate_packed needs at least one row")
    real = sum(r.num_tokens for r in rows)
    width = real if flatten else max(r.num_tokens for r in rows)
    height = 1 if flatten else len(rows)
    input_ids = np.full((height, width), pad_token_id, dtype=np.int64)
    labels = np.full((height, width), IGNORE_INDEX, dtype=np.int64)
    position_ids = np.zeros((height, width), dtype=np.int64)
    lengths: list[np.ndarray] = []
    cursor = 0
    for r, row in enumerate(rows):
        y = 0 if flatten else r
        x0 = cursor if flatten else 0
        n = row.num_tokens
        input_ids[y, x0 : x0 + n] = row.input_ids
        labels[y, x0 : x0 + n] = row.labels
        position_ids[y, x0 : x0 + n] = row.position_ids
        lengths.append(np.diff(row.cu_seqlens))
        pad = 0 if flatten else width - n
        if pad:
            position_ids[y, n:] = np.arange(pad)
            lengths.append(np.array([pad]))
        cursor += n
    seq_lengths = np.concatenate(lengths).astype(np.int32)
    cu_seqlens = np.zeros(seq_lengths.shape[0] + 1, dtype=np.int32)
    np.cumsum(seq_lengths, out=cu_seqlens[1:])
    max_seqlen = int(seq_lengths.max())
    cu = torch.from_numpy(cu_seqlens)
    return {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(position_ids),
        "cu_seqlens": cu,
        "max_seqlen": max_seqlen,
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": max_seqlen,
        "max_length_k": max_seqlen,
        "num_real_tokens": real,
    }
