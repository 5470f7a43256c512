"""Sequence packing for padding-free finetuning: many examples per row, no padding inside a row.

``pack_sequences`` streams examples through the compiled best-fit-decreasing packer
(``refteacher.engine._packer``, algorithm documented at the top of csrc/packer.cpp and mirrored in
``refteacher.engine.packing_reference``) and yields ``PackedRow`` objects as soon as rows are decided.
``collate_packed`` turns a list of rows into the torch tensors of one training step.

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
- Token ids must fit in int32 (the compiled packer holds pending ids as int32); the row arrays are
  still int64 (``input_ids``, ``labels``, ``position_ids``, ``example_index``) and int32
  (``cu_seqlens``). The rows of one ``pop_ready`` batch are views into shared flat arrays, whose
  memory the packer reuses for later rows once every view of them is gone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from refteacher.engine.data import _packer
from refteacher.engine.data.chat_examples import IGNORE_INDEX
from refteacher.engine.errors import UserError

OVERFLOW_MODES = ("error", "truncate", "split")
DEFAULT_WINDOW = 1000
DEFAULT_MAX_OPEN = 64
_CHUNK_EXAMPLES = 1024
_BATCH_TOKENS = 65536  # tokens per add_many call: small enough for the packer's buffers to stay in cache
_MAX_TOKEN_ID = int(np.iinfo(np.int32).max)  # the compiled packer keeps pending ids as int32


@dataclass(frozen=True, eq=False)
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


def _as_token_array(values: Any, index: int, what: str) -> np.ndarray:
    try:
        array = np.asarray(values)
    except (TypeError, ValueError) as exc:
        raise UserError(f"example {index}: {what} must be a flat sequence of integers ({exc})") from None
    if array.ndim != 1:
        raise UserError(f"example {index}: {what} must be a flat 1-D sequence of integers, got shape {array.shape}")
    if array.size and array.dtype.kind not in "iu":
        raise UserError(f"example {index}: {what} must be integers, got dtype {array.dtype}")
    return array.astype(np.int64, copy=False)


def _is_sequence(value: Any) -> bool:
    return hasattr(value, "__len__") and not isinstance(value, (str, bytes))


def _is_pair(item: Any) -> bool:
    return isinstance(item, (tuple, list)) and len(item) == 2 and _is_sequence(item[0]) and _is_sequence(item[1])


def to_example(item: Any, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalise one input example to (ids int64 [n], loss mask bool [n]).

    ``item`` is an int sequence, an ``(input_ids, labels)`` pair or a mapping with ``input_ids`` and
    optional ``labels``; labels hold the token id where loss is taken and -100 elsewhere.
    Raises ``UserError`` naming ``index`` for empty, non-integer, negative or inconsistent input.
    """
    labels = None
    if isinstance(item, dict):
        if "input_ids" not in item:
            raise UserError(f"example {index}: a mapping needs an 'input_ids' key")
        ids_raw, labels = item["input_ids"], item.get("labels")
    elif _is_pair(item):
        ids_raw, labels = item
    else:
        ids_raw = item
    ids = _as_token_array(ids_raw, index, "input_ids")
    if ids.size == 0:
        raise UserError(f"example {index} is empty; drop empty examples before packing")
    if ids.min() < 0:
        raise UserError(f"example {index}: token ids must be >= 0, got {int(ids.min())}")
    if ids.max() > _MAX_TOKEN_ID:
        raise UserError(f"example {index}: token ids must fit in int32 (at most {_MAX_TOKEN_ID}), got {int(ids.max())}")
    if labels is None:
        return ids, np.ones(ids.shape[0], dtype=bool)
    label_array = _as_token_array(labels, index, "labels")
    if label_array.shape != ids.shape:
        raise UserError(
            f"example {index}: labels have {label_array.shape[0]} entries but input_ids {ids.shape[0]}; "
            "give one label per token"
        )
    mask = label_array != IGNORE_INDEX
    if not np.array_equal(label_array[mask], ids[mask]):
        raise UserError(
            f"example {index}: labels must equal input_ids where loss is taken and be -100 elsewhere "
            "(pass unshifted labels; the model shifts them)"
        )
    return ids, mask


def rows_from_ready(ready: tuple[np.ndarray, ...]) -> list[PackedRow]:
    """Split the flat arrays of ``Packer.pop_ready()`` into ``PackedRow`` objects (views, no copies).

    ``ready`` is (input_ids int64 [T], labels int64 [T], position_ids int64 [T], row_offsets int64
    [R + 1], cu_seqlens int32 [S + R], example_index int64 [S], row_segment_offsets int64 [R + 1]);
    returns R rows. Runs once per packed row, so it builds rows without the frozen dataclass's
    ``__init__`` (about 1 us a row instead of 3).
    """
    ids, labels, positions, row_offsets, cu_flat, examples, seg_offsets = ready
    token_bounds = row_offsets.tolist()
    segment_bounds = seg_offsets.tolist()
    rows: list[PackedRow] = []
    append = rows.append
    new_row = object.__new__
    for r, (a, b, s, t) in enumerate(zip(token_bounds, token_bounds[1:], segment_bounds, segment_bounds[1:])):
        row = new_row(PackedRow)
        fields = row.__dict__  # the same attributes PackedRow.__init__ would set
        fields["input_ids"] = ids[a:b]
        fields["labels"] = labels[a:b]
        fields["position_ids"] = positions[a:b]
        fields["cu_seqlens"] = cu_flat[s + r : t + r + 1]
        fields["example_index"] = examples[s:t]
        append(row)
    return rows


def _new_packer(max_len: int, window: int, overflow: str, max_open: int):
    return _packer.Packer(int(max_len), int(window), overflow, int(max_open))


def _call(fn, *args) -> None:
    try:
        fn(*args)
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

    ``examples``: any iterable of int sequences, ``(input_ids, labels)`` pairs or mappings with
    ``input_ids``/``labels`` (see ``to_example``). ``window``: examples held back to choose from
    (best-fit-decreasing over the window); ``max_open``: rows kept open at once. ``overflow`` for an
    example longer than ``max_len``: "error" (UserError naming its index), "truncate" (keep the first
    ``max_len`` tokens) or "split" (consecutive pieces of ``max_len``, each its own sequence).
    Input is read in chunks of 1024 examples, so memory is bounded by window, chunk and open rows.
    Arguments are checked at once; examples as the iterator is consumed.
    """
    check_pack_args(max_len, window, overflow, max_open)
    packer = _new_packer(max_len, window, overflow, max_open)
    return _stream_examples(packer, examples)


def _stream_examples(packer, examples: Iterable[Any]) -> Iterator[PackedRow]:
    ids_chunk: list[np.ndarray] = []
    mask_chunk: list[np.ndarray] = []
    index = 0
    for item in examples:
        ids, mask = to_example(item, index)
        index += 1
        ids_chunk.append(ids)
        mask_chunk.append(mask)
        if len(ids_chunk) == _CHUNK_EXAMPLES:
            yield from _add_chunk(packer, ids_chunk, mask_chunk)
            ids_chunk, mask_chunk = [], []
    if ids_chunk:
        yield from _add_chunk(packer, ids_chunk, mask_chunk)
    _call(packer.flush)
    yield from rows_from_ready(packer.pop_ready())


def _add_chunk(packer, ids_chunk: list[np.ndarray], mask_chunk: list[np.ndarray]) -> Iterator[PackedRow]:
    offsets = np.zeros(len(ids_chunk) + 1, dtype=np.int64)
    np.cumsum([a.shape[0] for a in ids_chunk], out=offsets[1:])
    return _add_in_batches(packer, np.concatenate(ids_chunk), offsets, np.concatenate(mask_chunk))


def _add_in_batches(packer, flat_ids: np.ndarray, offsets: np.ndarray, mask: np.ndarray | None) -> Iterator[PackedRow]:
    """Add one chunk (flat ids [T], int64 offsets [n + 1], mask [T] or None) in consecutive slices
    of about ``_BATCH_TOKENS`` tokens, yielding the rows each slice decides.

    Same rows as one ``add_many`` of the whole chunk (the packer sees the same examples in the same
    order); small slices keep the output blocks, which the packer recycles as rows are dropped, in
    cache (faster than fixed slices of 1024 examples; see benchmarks/bench_packing.py).
    """
    n = offsets.shape[0] - 1
    cuts = [0, n]
    if n > 1 and offsets[-1] - offsets[0] > _BATCH_TOKENS:
        targets = np.arange(offsets[0] + _BATCH_TOKENS, offsets[-1], _BATCH_TOKENS)
        inner = np.clip(np.searchsorted(offsets, targets, side="right"), 1, n)
        # Monotone even if offsets are not (add_many rejects those); every example in one slice.
        cuts = [0, *np.maximum.accumulate(inner).tolist(), n]
    for lo, hi in zip(cuts, cuts[1:]):
        if hi > lo or n == 0:
            _call(packer.add_many, flat_ids, offsets[lo : hi + 1], mask)
            yield from rows_from_ready(packer.pop_ready())


def pack_token_chunks(
    chunks: Iterable[tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, np.ndarray | None]],
    max_len: int,
    window: int = DEFAULT_WINDOW,
    overflow: str = "error",
    max_open: int = DEFAULT_MAX_OPEN,
) -> Iterator[PackedRow]:
    """Fast path of ``pack_sequences`` for data already in flat numpy form.

    Each chunk is ``(flat_ids, offsets)`` or ``(flat_ids, offsets, flat_label_mask)``: integer ids
    [T] of any integer dtype (read in place, not copied or cast), int64 offsets [n + 1] (example i
    is ``flat_ids[offsets[i]:offsets[i+1]]``) and an optional bool mask [T] (True = loss). Example
    indices count across chunks. Same rows as ``pack_sequences`` on the same examples; ids are not
    checked for negativity here, but ids outside int32 raise ``UserError``.
    """
    check_pack_args(max_len, window, overflow, max_open)
    packer = _new_packer(max_len, window, overflow, max_open)

    def stream() -> Iterator[PackedRow]:
        for chunk in chunks:
            flat_ids, offsets = chunk[0], chunk[1]
            mask = chunk[2] if len(chunk) > 2 else None
            offsets = np.ascontiguousarray(offsets, dtype=np.int64)
            if offsets.ndim != 1 or offsets.shape[0] < 1:
                raise UserError("offsets must be a 1-D array of n + 1 positions for n examples")
            yield from _add_in_batches(packer, np.asarray(flat_ids), offsets, mask)
        _call(packer.flush)
        yield from rows_from_ready(packer.pop_ready())

    return stream()


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
