"""Pure-Python twin of the compiled packer (csrc/packer.cpp): the same algorithm, step for step.

Tests check that both give identical rows and the same errors (``to_example`` is the Python twin of
the per-example checks the C++ ``add_list`` makes); the benchmark measures the speed gap. The algorithm:
pending examples (at most ``window``) are taken longest first (earliest among equals) once the
window overflows, and placed by best fit into at most ``max_open`` open rows (least remaining space
that fits, lowest row id among equals); when none fits and all ``max_open`` rows are open, the
fullest row is first topped up with the longest pending examples that still fit and emitted.
A row whose space reaches 0 is emitted at once; ``flush`` places everything left and emits the open
rows in the order they were opened. See csrc/packer.cpp for the full statement.
"""
from __future__ import annotations

from bisect import bisect_left, insort
from typing import Any, Iterable, Iterator

import numpy as np

from refteacher.engine.data.packing import (
    DEFAULT_MAX_OPEN,
    DEFAULT_WINDOW,
    IGNORE_INDEX,
    PackedRow,
    check_pack_args,
)
from refteacher.engine.errors import UserError

_INF = float("inf")
_MAX_TOKEN_ID = int(np.iinfo(np.int32).max)  # the compiled packer keeps pending ids as int32


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


class ReferencePacker:
    """The packer in plain Python: ``add(ids, mask, example)``, ``flush()``, ``pop_ready()`` -> rows.

    ``ids`` and ``mask`` are Python lists (ints, bools); ``pop_ready`` returns ``PackedRow`` objects.
    """

    def __init__(self, max_len: int, window: int, overflow: str, max_open: int) -> None:
        check_pack_args(max_len, window, overflow, max_open)
        self.max_len, self.window, self.overflow, self.max_open = max_len, window, overflow, max_open
        # pending keys sort ascending as (-length, arrival): the first key is the longest, earliest.
        self._pending: list[tuple[int, int]] = []
        self._items: dict[int, tuple[int, list[int], list[bool]]] = {}
        self._arrival = 0
        # open rows sort ascending as (remaining, row id): the first is the fullest.
        self._open: list[tuple[int, int]] = []
        self._row_items: dict[int, list[int]] = {}
        self._next_row = 0
        self._ready: list[PackedRow] = []

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    def add(self, ids: list[int], mask: list[bool], example: int) -> None:
        """Add one example (already checked non-empty) under input index ``example``."""
        if len(ids) > self.max_len:
            if self.overflow == "error":
                raise ValueError(f"example {example} has {len(ids)} tokens, more than max_len={self.max_len}")
            if self.overflow == "truncate":
                ids, mask = ids[: self.max_len], mask[: self.max_len]
        for start in range(0, len(ids), self.max_len):
            self._push(example, ids[start : start + self.max_len], mask[start : start + self.max_len])

    def _push(self, example: int, ids: list[int], mask: list[bool]) -> None:
        arrival = self._arrival
        self._arrival += 1
        self._items[arrival] = (example, ids, mask)
        insort(self._pending, (-len(ids), arrival))
        while len(self._pending) > self.window:
            self._step()

    def _step(self) -> None:
        neg_length, arrival = self._pending.pop(0)
        self._place(-neg_length, arrival)

    def _place(self, length: int, arrival: int) -> None:
        at = bisect_left(self._open, (length, -_INF))
        if at < len(self._open):
            remaining, row = self._open.pop(at)
            self._put(row, remaining, length, arrival)
            return
        if len(self._open) >= self.max_open:
            remaining, row = self._open.pop(0)
            remaining = self._fill(row, remaining)
            self._emit(row)
        row = self._next_row
        self._next_row += 1
        self._row_items[row] = []
        self._put(row, self.max_len, length, arrival)

    def _put(self, row: int, remaining: int, length: int, arrival: int) -> None:
        self._row_items[row].append(arrival)
        remaining -= length
        if remaining == 0:
            self._emit(row)
        else:
            insort(self._open, (remaining, row))

    def _fill(self, row: int, remaining: int) -> int:
        while remaining > 0 and self._pending:
            at = bisect_left(self._pending, (-remaining, -_INF))
            if at == len(self._pending):
                break
            neg_length, arrival = self._pending.pop(at)
            self._row_items[row].append(arrival)
            remaining += neg_length
        return remaining

    def _emit(self, row: int) -> None:
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        cu = [0]
        examples = []
        for arrival in self._row_items.pop(row):
            example, item_ids, item_mask = self._items.pop(arrival)
            ids.extend(item_ids)
            item_labels = [t if m else IGNORE_INDEX for t, m in zip(item_ids, item_mask)]
            item_labels[0] = IGNORE_INDEX
            labels.extend(item_labels)
            positions.extend(range(len(item_ids)))
            cu.append(cu[-1] + len(item_ids))
            examples.append(example)
        self._ready.append(
            PackedRow(
                input_ids=np.array(ids, dtype=np.int64),
                labels=np.array(labels, dtype=np.int64),
                position_ids=np.array(positions, dtype=np.int64),
                cu_seqlens=np.array(cu, dtype=np.int32),
                example_index=np.array(examples, dtype=np.int64),
            )
        )

    def flush(self) -> None:
        """Place every pending example, then emit the open rows in the order they were opened."""
        while self._pending:
            self._step()
        for _, row in sorted(self._open, key=lambda key: key[1]):
            self._emit(row)
        self._open = []

    def pop_ready(self) -> list[PackedRow]:
        """Return and forget the rows decided so far."""
        ready, self._ready = self._ready, []
        return ready


def pack_sequences_reference(
    examples: Iterable[Any],
    max_len: int,
    window: int = DEFAULT_WINDOW,
    overflow: str = "error",
    max_open: int = DEFAULT_MAX_OPEN,
) -> Iterator[PackedRow]:
    """Same contract and same rows as ``refteacher.engine.data.packing.pack_sequences``, in plain Python."""
    packer = ReferencePacker(max_len, window, overflow, max_open)

    def stream() -> Iterator[PackedRow]:
        for index, item in enumerate(examples):
            ids, mask = to_example(item, index)
            try:
                packer.add(ids.tolist(), mask.tolist(), index)
            except ValueError as exc:
                raise UserError(str(exc)) from None
            yield from packer.pop_ready()
        packer.flush()
        yield from packer.pop_ready()

    return stream()
