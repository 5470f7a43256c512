"""The streaming packer: C++ against its Python twin, row invariants, overflow, errors, streaming, collate."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refteacher.engine.data import _packer
from refteacher.engine.data.packing import (
    PackedRow,
    collate_packed,
    pack_arrow,
    pack_sequences,
    pack_token_chunks,
    packing_efficiency,
)
from refteacher.engine.data.packing_reference import pack_sequences_reference
from refteacher.engine.errors import UserError


def make_examples(lengths, seed=0, with_labels=False):
    """Random examples of the given lengths; with_labels gives (ids, labels) pairs with -100 holes."""
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        ids = rng.integers(0, 1000, n)
        if with_labels:
            labels = np.where(rng.random(n) < 0.3, -100, ids)
            out.append((ids.tolist(), labels.tolist()))
        else:
            out.append(ids.tolist())
    return out


def ids_and_mask(example):
    if isinstance(example, tuple):
        ids, labels = np.asarray(example[0]), np.asarray(example[1])
        return ids, labels != -100
    ids = np.asarray(example)
    return ids, np.ones(len(ids), dtype=bool)


def check_rows(rows, examples, max_len, overflow="error"):
    """Assert every row invariant and that the rows hold exactly the examples (per overflow mode)."""
    pieces: dict[int, list[np.ndarray]] = {}
    for row in rows:
        n = row.num_tokens
        assert 1 <= n <= max_len
        assert row.input_ids.dtype == np.int64 and row.labels.dtype == np.int64
        assert row.position_ids.dtype == np.int64 and row.example_index.dtype == np.int64
        assert row.cu_seqlens.dtype == np.int32
        assert row.labels.shape == row.position_ids.shape == (n,)
        assert row.cu_seqlens[0] == 0 and row.cu_seqlens[-1] == n
        assert np.all(np.diff(row.cu_seqlens) > 0)
        assert len(row.example_index) == len(row.cu_seqlens) - 1
        for k, example in enumerate(row.example_index):
            a, b = int(row.cu_seqlens[k]), int(row.cu_seqlens[k + 1])
            np.testing.assert_array_equal(row.position_ids[a:b], np.arange(b - a))
            seg_ids, seg_labels = row.input_ids[a:b], row.labels[a:b]
            assert seg_labels[0] == -100
            pieces.setdefault(int(example), []).append((seg_ids, seg_labels))
    assert sorted(pieces) == list(range(len(examples))), "every example must appear"
    for index, example in enumerate(examples):
        ids, mask = ids_and_mask(example)
        expected_labels = np.where(mask, ids, -100)
        got = pieces[index]
        if overflow != "split":
            assert len(got) == 1, f"example {index} must be in exactly one row"
        if overflow == "truncate":
            ids, expected_labels = ids[:max_len], expected_labels[:max_len]
        if overflow == "split":
            # Pieces are the consecutive max_len chunks, but a short tail may sit in a row emitted
            # before its head's (best fit): put each piece at its chunk, every chunk used once.
            starts = list(range(0, len(ids), max_len))
            placed = {}
            for piece in got:
                match = [s for s in starts if s not in placed and np.array_equal(piece[0], ids[s:s + max_len])]
                assert match, f"example {index}: a piece is not one of its max_len chunks"
                placed[match[0]] = piece
            assert sorted(placed) == starts, f"example {index}: chunks missing"
            got = [placed[s] for s in starts]
        got_ids = np.concatenate([g[0] for g in got])
        np.testing.assert_array_equal(got_ids, ids)
        offset = 0
        for seg_ids, seg_labels in got:
            np.testing.assert_array_equal(seg_labels[1:], expected_labels[offset + 1 : offset + len(seg_ids)])
            offset += len(seg_ids)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    max_len=st.integers(1, 48),
    window=st.integers(1, 12),
    max_open=st.integers(1, 6),
    overflow=st.sampled_from(["error", "truncate", "split"]),
    with_labels=st.booleans(),
)
def test_cpp_matches_python_reference(data, max_len, window, max_open, overflow, with_labels):
    top = max_len if overflow == "error" else 3 * max_len
    lengths = data.draw(st.lists(st.integers(1, top), max_size=80))
    examples = make_examples(lengths, seed=len(lengths), with_labels=with_labels)
    fast = list(pack_sequences(examples, max_len, window=window, overflow=overflow, max_open=max_open))
    slow = list(pack_sequences_reference(examples, max_len, window=window, overflow=overflow, max_open=max_open))
    assert len(fast) == len(slow)
    for a, b in zip(fast, slow):
        assert a == b
    check_rows(fast, examples, max_len, overflow)


def test_chunk_path_matches_per_example_path():
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 200, 3000)
    examples = make_examples(lengths, seed=2)
    flat = np.concatenate([np.asarray(e) for e in examples])
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    cut = 1234
    chunks = [
        (flat[: offsets[cut]], offsets[: cut + 1]),
        (flat[offsets[cut] :], offsets[cut:] - offsets[cut]),
    ]
    chunked = list(pack_token_chunks(chunks, 256, window=100))
    direct = list(pack_sequences(examples, 256, window=100))
    assert len(chunked) == len(direct)
    assert all(a == b for a, b in zip(chunked, direct))
    check_rows(direct, examples, 256)


def test_lognormal_efficiency_at_least_99_percent():
    rng = np.random.default_rng(0)
    lengths = np.clip(np.rint(rng.lognormal(np.log(250), 1.0, 5000)), 1, 4096).astype(int)
    examples = make_examples(lengths)
    rows = list(pack_sequences(examples, 4096, window=1000))
    check_rows(rows, examples, 4096)
    assert packing_efficiency(rows, 4096) >= 0.99


def test_accepts_pairs_mappings_and_numpy_arrays():
    examples = [
        [5, 6, 7],
        ([1, 2, 3], [-100, 2, 3]),
        {"input_ids": np.array([4, 4], dtype=np.int32), "labels": [-100, 4]},
        {"input_ids": np.array([9], dtype=np.uint16)},
        np.array([8, 8, 8, 8]),
    ]
    rows = list(pack_sequences(examples, 8, window=2))
    check_rows(rows, [examples[0], (examples[1][0], examples[1][1]), ([4, 4], [-100, 4]), [9], [8, 8, 8, 8]], 8)


def test_labels_mask_and_first_token():
    rows = list(pack_sequences([([10, 11, 12, 13], [-100, -100, 12, 13]), [20, 21]], 16))
    assert len(rows) == 1
    row = rows[0]
    np.testing.assert_array_equal(row.example_index, [0, 1])
    np.testing.assert_array_equal(row.input_ids, [10, 11, 12, 13, 20, 21])
    np.testing.assert_array_equal(row.labels, [-100, -100, 12, 13, -100, 21])
    np.testing.assert_array_equal(row.position_ids, [0, 1, 2, 3, 0, 1])
    np.testing.assert_array_equal(row.cu_seqlens, [0, 4, 6])


def test_best_fit_decreasing_on_a_known_case():
    # Window holds everything, so this is offline best-fit decreasing: 6+4, 5+5, 4+3+3 rows of 10.
    rows = list(pack_sequences(make_examples([3, 6, 5, 4, 4, 5, 3]), 10, window=100))
    assert sorted(sorted(r.example_index.tolist()) for r in rows) == [[0, 4, 6], [1, 3], [2, 5]]
    assert packing_efficiency(rows, 10) == 1.0


def test_overflow_truncate_and_split():
    examples = make_examples([25, 3, 10])
    truncated = list(pack_sequences(examples, 10, overflow="truncate"))
    check_rows(truncated, examples, 10, "truncate")
    split = list(pack_sequences(examples, 10, overflow="split"))
    check_rows(split, examples, 10, "split")
    assert sum(r.num_tokens for r in split) == 38


def test_overflow_error_names_the_example():
    examples = make_examples([5, 5, 11, 3])
    with pytest.raises(UserError, match=r"example 2 has 11 tokens.*max_len=10"):
        list(pack_sequences(examples, 10))
    with pytest.raises(UserError, match=r"example 2 has 11 tokens"):
        list(pack_sequences_reference(examples, 10))


@pytest.mark.parametrize(
    "examples, match",
    [
        ([[1, 2], []], "example 1 is empty"),
        ([[1, 2], [1.5, 2.0]], "example 1: input_ids must be integers"),
        ([["a", "b"]], "example 0: input_ids must be integers"),
        ([[1, -3]], "token ids must be >= 0"),
        ([([1, 2, 3], [-100, 2])], "labels have 2 entries"),
        ([([1, 2, 3], [-100, 7, 3])], "labels must equal input_ids"),
        ([[[1, 2], [3, 4], [5, 6]]], "1-D"),
    ],
)
def test_bad_examples_raise_user_error(examples, match):
    with pytest.raises(UserError, match=match):
        list(pack_sequences(examples, 8))
    with pytest.raises(UserError, match=match):
        list(pack_sequences_reference(examples, 8))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_len": 0}, "max_len must be an integer >= 1"),
        ({"max_len": 2.5}, "max_len must be an integer >= 1"),
        ({"max_len": 8, "window": 0}, "window must be an integer >= 1"),
        ({"max_len": 8, "overflow": "drop"}, "overflow must be one of"),
        ({"max_len": 8, "max_open": 0}, "max_open must be an integer >= 1"),
    ],
)
def test_bad_arguments_raise_at_once(kwargs, match):
    with pytest.raises(UserError, match=match):
        pack_sequences([[1]], **kwargs)


def test_compiled_packer_rejects_bad_arrays():
    packer = _packer.Packer(8, 4, "error", 2)
    with pytest.raises(ValueError, match="integers"):
        packer.add(np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="label mask"):
        packer.add(np.array([1, 2]), np.array([1, 0, 1], dtype=bool))
    with pytest.raises(ValueError, match="empty"):
        packer.add_many(np.array([1, 2], dtype=np.int64), np.array([0, 2, 2], dtype=np.int64))
    assert packer.examples_added == 0 and packer.pending_count == 0  # a failed call adds nothing


def test_streaming_emits_rows_before_input_ends_and_stays_bounded():
    rng = np.random.default_rng(3)
    lengths = rng.integers(1, 64, 20_000)
    consumed = 0

    def source():
        nonlocal consumed
        for n in lengths:
            consumed += 1
            yield list(range(1, n + 1))

    rows = pack_sequences(source(), 128, window=50)
    next(rows)
    assert consumed < 3000, "the first row must come out long before the input ends"

    packer = _packer.Packer(128, 50, "error", 8)
    max_pending = max_open = 0
    for n in lengths[:5000]:
        packer.add(np.arange(n))
        max_pending = max(max_pending, packer.pending_count)
        max_open = max(max_open, packer.open_count)
    assert max_pending == 50 and max_open <= 8
    assert packer.ready_rows > 0


def _rows(lengths, max_len=16):
    return list(pack_sequences(make_examples(lengths, seed=5, with_labels=True), max_len, window=4))


def test_collate_padded_shapes_and_dtypes():
    rows = _rows([5, 9, 3, 7, 16, 2])
    batch = collate_packed(rows, pad_token_id=0)
    width = max(r.num_tokens for r in rows)
    for key in ("input_ids", "labels", "position_ids"):
        assert batch[key].shape == (len(rows), width) and batch[key].dtype == torch.long
    assert batch["cu_seqlens"].dtype == torch.int32
    flat_pos = batch["position_ids"].reshape(-1)
    starts = torch.nonzero(flat_pos == 0).reshape(-1).to(torch.int32)
    assert torch.equal(batch["cu_seqlens"][:-1], starts)
    assert int(batch["cu_seqlens"][-1]) == len(rows) * width
    assert batch["max_seqlen"] == int(torch.diff(batch["cu_seqlens"]).max())
    assert batch["num_real_tokens"] == sum(r.num_tokens for r in rows)
    for r, row in enumerate(rows):
        n = row.num_tokens
        assert torch.all(batch["labels"][r, n:] == -100) and torch.all(batch["input_ids"][r, n:] == 0)
        assert torch.equal(batch["labels"][r, :n], torch.from_numpy(row.labels))


def test_collate_flatten_has_no_padding():
    rows = _rows([5, 9, 3, 7, 16, 2])
    batch = collate_packed(rows, flatten=True)
    total = sum(r.num_tokens for r in rows)
    assert batch["input_ids"].shape == (1, total)
    assert int(batch["cu_seqlens"][-1]) == total
    assert torch.equal(batch["input_ids"][0], torch.from_numpy(np.concatenate([r.input_ids for r in rows])))
    with pytest.raises(UserError, match="collate_packed needs at least one row"):
        collate_packed([])


def test_collated_batch_keeps_attention_inside_each_example():
    """A tiny Llama on the packed batch gives the same logits as on each example alone."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    examples = make_examples([5, 9, 3, 7, 12, 2], seed=7)
    rows = list(pack_sequences(examples, 16, window=3))
    assert any(len(r.example_index) > 1 for r in rows)
    batch = collate_packed(rows)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        for r, row in enumerate(rows):
            for k, example in enumerate(row.example_index):
                a, b = int(row.cu_seqlens[k]), int(row.cu_seqlens[k + 1])
                alone = model(input_ids=torch.tensor([examples[example]])).logits[0]
                torch.testing.assert_close(packed[r, a:b], alone, atol=1e-4, rtol=1e-4)


def test_packed_row_equality_checks_dtype_and_values():
    row = _rows([3, 4])[0]
    same = PackedRow(*(a.copy() for a in row._arrays()))
    assert row == same
    other = PackedRow(row.input_ids, row.labels, row.position_ids, row.cu_seqlens.astype(np.int64), row.example_index)
    assert row != other


def _flat_chunk(lengths, seed, with_mask):
    rng = np.random.default_rng(seed)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat = rng.integers(0, 50_000, int(offsets[-1]))
    mask = rng.random(flat.shape[0]) < 0.7 if with_mask else None
    examples = []
    for i in range(len(lengths)):
        ids = flat[offsets[i] : offsets[i + 1]]
        if with_mask:
            m = mask[offsets[i] : offsets[i + 1]]
            examples.append((ids.tolist(), np.where(m, ids, -100).tolist()))
        else:
            examples.append(ids.tolist())
    return flat, offsets, mask, examples


@pytest.mark.parametrize("with_mask", [False, True])
def test_long_chunks_are_added_in_slices_with_the_same_rows(with_mask):
    """A chunk far over the per-call token batch gives the reference's rows, and one add_many's."""
    from refteacher.engine.data.packing import _BATCH_TOKENS, rows_from_ready

    lengths = np.random.default_rng(4).integers(1, 300, 2500)
    flat, offsets, mask, examples = _flat_chunk(lengths, 5, with_mask)
    assert offsets[-1] > 3 * _BATCH_TOKENS
    sliced = list(pack_token_chunks([(flat, offsets, mask)], 512, window=60, max_open=8))
    reference = list(pack_sequences_reference(examples, 512, window=60, max_open=8))
    packer = _packer.Packer(512, 60, "error", 8)
    packer.add_many(flat, offsets, mask)
    packer.flush()
    whole = rows_from_ready(packer.pop_ready())
    assert len(sliced) == len(reference) == len(whole)
    assert all(a == b == c for a, b, c in zip(sliced, reference, whole))
    check_rows(sliced, examples, 512)


def test_chunk_ids_of_any_integer_dtype_and_layout_give_the_same_rows():
    lengths = np.random.default_rng(6).integers(1, 90, 400)
    flat, offsets, _, examples = _flat_chunk(lengths, 7, False)
    expected = list(pack_token_chunks([(flat, offsets)], 128, window=30))
    strided = np.zeros(2 * flat.shape[0], dtype=np.int64)
    strided[::2] = flat
    variants = [flat.astype(np.int32), flat.astype(np.uint16), flat.astype(np.uint32), flat.astype(">i8"),
                strided[::2], flat.astype(np.uint64)]
    for ids in variants:
        got = list(pack_token_chunks([(ids, offsets)], 128, window=30))
        assert len(got) == len(expected), ids.dtype
        assert all(a == b for a, b in zip(got, expected)), ids.dtype
    check_rows(expected, examples, 128)


def test_token_ids_must_fit_in_int32():
    big = 2**31
    with pytest.raises(UserError, match=r"example 1: token ids must fit in int32"):
        list(pack_sequences([[1, 2], [3, big]], 8))
    with pytest.raises(UserError, match=r"example 1: token ids must fit in int32"):
        list(pack_sequences_reference([[1, 2], [3, big]], 8))
    with pytest.raises(UserError, match="fit in int32"):
        list(pack_token_chunks([(np.array([1, 2, big], dtype=np.uint64), np.array([0, 1, 3]))], 8))
    with pytest.raises(UserError, match=r"example 1: token ids must be >= 0, got -1"):
        list(pack_token_chunks([(np.array([1, 2, -1], dtype=np.int16), np.array([0, 1, 3]))], 8))
    packer = _packer.Packer(8, 4, "error", 2)
    with pytest.raises(
        ValueError, match=r"example 1: token ids must fit in int32 \(at most 2147483647\), got 2147483648"
    ):
        packer.add_many(np.array([5, big], dtype=np.int64), np.array([0, 1, 2], dtype=np.int64))
    with pytest.raises(ValueError, match=r"example 1: token ids must be >= 0"):
        packer.add_many(np.array([5, -big - 1], dtype=np.int64), np.array([0, 1, 2], dtype=np.int64))
    assert packer.examples_added == 0 and packer.pending_count == 0  # a failed call adds nothing
    packer.add(np.array([big - 1, 0], dtype=np.int64))  # the range's ends are fine
    packer.flush()
    ids = packer.pop_ready()[0]
    assert ids.dtype == np.int64 and ids.tolist() == [big - 1, 0]


def test_popped_arrays_keep_their_values_while_memory_is_recycled():
    """pop_ready's blocks are reused only once numpy frees them: kept rows never change."""
    import gc

    lengths = np.random.default_rng(8).integers(1, 200, 3000)
    flat, offsets, _, _ = _flat_chunk(lengths, 9, False)
    packer = _packer.Packer(256, 40, "error", 4)
    kept, copies = [], []
    for lo in range(0, 3000, 100):
        packer.add_many(flat, offsets[lo : lo + 101])
        ready = packer.pop_ready()
        if lo % 700 == 0:  # keep a few batches, drop the rest (their blocks go back to the pool)
            kept.append(ready)
            copies.append([a.copy() for a in ready])
        del ready
    packer.flush()
    last = packer.pop_ready()
    del packer
    gc.collect()
    assert len(kept) == 5 and last[0].shape[0] > 0
    for ready, copy in zip(kept, copies):
        for a, b in zip(ready, copy):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)



# --------------------------------------------------------------------------------------------
# Arrow list columns, flat chunks and per-example lists: one packer, the same rows
# --------------------------------------------------------------------------------------------


def _list_column(rows, large=False, value_type=pa.int32()):
    kind = pa.large_list(value_type) if large else pa.list_(value_type)
    return pa.array([[int(v) for v in row] for row in rows], type=kind)


def _same_rows(got, expected):
    assert len(got) == len(expected)
    assert all(a == b for a, b in zip(got, expected))


@pytest.mark.parametrize("large", [False, True])
@pytest.mark.parametrize("with_labels", [False, True])
def test_arrow_column_gives_the_rows_of_per_example_input(large, with_labels):
    lengths = np.random.default_rng(10).integers(1, 300, 1500)
    examples = make_examples(lengths, seed=11, with_labels=with_labels)
    ids = [e[0] for e in examples] if with_labels else examples
    column = _list_column(ids, large, pa.int64() if large else pa.int32())
    labels = _list_column([e[1] for e in examples], large, pa.int64()) if with_labels else None
    expected = list(pack_sequences(examples, 512, window=50, max_open=8))
    check_rows(expected, examples, 512)
    _same_rows(list(pack_arrow(column, 512, labels=labels, window=50, max_open=8)), expected)
    # Chunked columns (sliced chunks over shared buffers), chunked differently for ids and labels.
    chunked = pa.chunked_array([column.slice(s, 400) for s in range(0, len(column), 400)])
    chunked_labels = None
    if with_labels:
        chunked_labels = pa.chunked_array([labels.slice(s, 333) for s in range(0, len(labels), 333)])
    _same_rows(list(pack_arrow(chunked, 512, labels=chunked_labels, window=50, max_open=8)), expected)
    # An iterable of chunks, as record batches stream from a file.
    parts = iter(chunked.chunks)
    _same_rows(list(pack_arrow(parts, 512, labels=chunked_labels, window=50, max_open=8)), expected)


def test_arrow_batches_streamed_from_parquet_give_the_same_rows(tmp_path):
    lengths = np.random.default_rng(12).integers(1, 200, 700)
    examples = make_examples(lengths, seed=13, with_labels=True)
    table = pa.table({"input_ids": _list_column([e[0] for e in examples]),
                      "labels": _list_column([e[1] for e in examples], value_type=pa.int64())})
    path = tmp_path / "tokens.parquet"
    pq.write_table(table, path, row_group_size=128)
    batches = list(pq.ParquetFile(path).iter_batches(batch_size=100))
    got = list(pack_arrow((b.column("input_ids") for b in batches), 256,
                          labels=(b.column("labels") for b in batches), window=40))
    _same_rows(got, list(pack_sequences(examples, 256, window=40)))


def test_arrow_buffers_are_read_in_place():
    from refteacher.engine.data.packing import _list_buffers

    column = _list_column([[1, 2, 3], [4, 5], [6]] * 10).slice(4, 12)
    values, offsets = _list_buffers(column, "input_ids", 0)
    assert values.dtype == np.int32 and offsets.dtype == np.int32
    assert values.ctypes.data == column.values.buffers()[1].address  # the Arrow values buffer itself
    assert offsets.ctypes.data == column.buffers()[1].address + 4 * column.offset
    large = _list_column([[1, 2], [3]], large=True, value_type=pa.int64())
    values, offsets = _list_buffers(large, "input_ids", 0)
    assert offsets.dtype == np.int64 and offsets.ctypes.data == large.buffers()[1].address


def test_empty_input_gives_no_rows():
    empty = pa.array([], type=pa.list_(pa.int32()))
    assert list(pack_sequences([], 8)) == []
    assert list(pack_sequences_reference([], 8)) == []
    assert list(pack_token_chunks([], 8)) == []
    assert list(pack_token_chunks([(np.zeros(0, np.int32), np.zeros(1, np.int64))], 8)) == []
    assert list(pack_arrow(empty, 8)) == []
    assert list(pack_arrow(pa.chunked_array([], type=empty.type), 8)) == []
    assert list(pack_arrow(pa.chunked_array([empty, empty]), 8, labels=pa.chunked_array([empty]))) == []


@pytest.mark.parametrize("overflow", ["error", "truncate", "split"])
def test_an_example_longer_than_max_len_is_treated_alike_on_every_input(overflow):
    examples = make_examples([5, 25, 3, 10], seed=3)
    flat = np.concatenate([np.asarray(e) for e in examples])
    offsets = np.array([0, 5, 30, 33, 43])
    runs = [
        lambda: list(pack_sequences(examples, 10, overflow=overflow)),
        lambda: list(pack_sequences_reference(examples, 10, overflow=overflow)),
        lambda: list(pack_token_chunks([(flat, offsets)], 10, overflow=overflow)),
        lambda: list(pack_arrow(_list_column(examples), 10, overflow=overflow)),
    ]
    if overflow == "error":
        for run in runs:
            with pytest.raises(UserError, match=r"example 1 has 25 tokens, more than max_len=10"):
                run()
        return
    expected = runs[0]()
    check_rows(expected, examples, 10, overflow)
    for run in runs[1:]:
        _same_rows(run(), expected)


@pytest.mark.parametrize(
    "offsets, match",
    [
        ([0, 3, 2, 5], r"offsets must be non-decreasing: offsets\[2\] = 2 < offsets\[1\] = 3 \(example 1\)"),
        ([0, 3, 9], r"offsets point outside the flat id array: the last offset is 9 but there are 5 token ids"),
        ([-1, 3], r"offsets point outside the flat id array: offsets\[0\] is -1"),
        ([0, 3, 3], "example 1 is empty"),
        ([], "offsets must"),
    ],
)
def test_bad_offsets_raise_a_clear_error(offsets, match):
    flat = np.arange(1, 6, dtype=np.int32)
    with pytest.raises(UserError, match=match):
        list(pack_token_chunks([(flat, np.array(offsets, dtype=np.int64))], 8))
    packer = _packer.Packer(8, 4, "error", 2)
    for dtype in (np.int32, np.int64):  # Arrow list and large_list offsets
        with pytest.raises(ValueError, match=match):
            packer.add_many(flat, np.array(offsets, dtype=dtype))
    with pytest.raises(ValueError, match="offsets must be"):
        packer.add_many(flat, np.array([0.0, 2.0]))
    assert packer.examples_added == 0 and packer.pending_count == 0


def test_arrow_input_errors_name_the_example():
    int_lists = pa.list_(pa.int32())
    bad = [
        (pa.array([[1], None, [2]], type=int_lists), None, r"example 1: input_ids is null"),
        (pa.chunked_array([pa.array([[1], [2]], type=int_lists), pa.array([[3], [-5]], type=int_lists)]), None,
         r"example 3: token ids must be >= 0, got -5"),
        (pa.array([[1.0, 2.0]]), None, r"input_ids must hold integers, got list<item: double>"),
        (pa.array([1, 2]), None, r"input_ids must be an Arrow list column"),
        (pa.array([[1, None]], type=int_lists), None, r"input_ids hold null values"),
        (pa.table({"input_ids": pa.array([[1]], type=int_lists)}), None, r"not a whole table"),
        ([[1, 2]], None, r"expected Arrow arrays, got list"),
        (pa.array([[1], [2]], type=int_lists), pa.array([[1]], type=int_lists), r"labels have fewer rows"),
        (pa.array([[1]], type=int_lists), pa.array([[1], [2]], type=int_lists), r"labels have more rows"),
        (pa.array([[1, 2], [3, 4]], type=int_lists), pa.array([[-100, 2], [-100, 5]], type=int_lists),
         r"example 1: labels must equal input_ids where loss is taken"),
        (pa.array([[1, 2], [3, 4]], type=int_lists), pa.array([[-100, 2], [4]], type=int_lists),
         r"example 1: labels have 1 entries but input_ids 2"),
    ]
    for ids, labels, match in bad:
        with pytest.raises(UserError, match=match):
            list(pack_arrow(ids, 8, labels=labels))


def test_per_example_input_of_mixed_kinds_is_read_like_numpy():
    big_list = list(range(1, 40))
    examples = [
        np.arange(1, 6, dtype=np.uint16),
        (1, 2, 3),
        [np.int64(7), np.int32(8)],
        torch.tensor([4, 5, 6]),
        range(1, 4),
        {"input_ids": big_list, "labels": [-100] * 10 + big_list[10:]},
        (np.array([9, 9]), np.array([-100, 9])),
        np.arange(200, dtype=np.int64)[::2],  # strided: read through one copy
        np.arange(5, dtype=">i4"),  # big-endian: read through one copy
    ]
    plain = [np.asarray(e["input_ids"] if isinstance(e, dict) else e[0] if isinstance(e, tuple) and
                        len(e) == 2 and hasattr(e[0], "__len__") else e) for e in examples]
    rows = list(pack_sequences(examples, 128, window=3))
    _same_rows(rows, list(pack_sequences_reference(examples, 128, window=3)))
    check_rows(rows, [([int(v) for v in p], [int(v) for v in (examples[5]["labels"] if i == 5 else
                      examples[6][1] if i == 6 else p)]) for i, p in enumerate(plain)], 128)


@pytest.mark.parametrize(
    "example, match",
    [
        ({"labels": [1]}, r"example 1: a mapping needs an 'input_ids' key"),
        ([1, True], r"example 1: input_ids must be integers, got bool"),
        ([1, 2.5], r"example 1: input_ids must be integers, got float"),
        ("abc", r"example 1: input_ids must be a flat sequence of integers, got str"),
        (None, r"example 1: input_ids must be a flat sequence of integers, got NoneType"),
        ([1, 2**70], r"example 1: token ids must fit in int32"),
        (np.zeros((2, 2), dtype=np.int64),
         r"example 1: input_ids must be a flat 1-D sequence of integers, got shape \(2, 2\)"),
        (([1, 2], [1.5, 2]), r"example 1: labels must be integers, got float"),
    ],
)
def test_per_example_checks_in_cpp_name_the_example(example, match):
    packer = _packer.Packer(8, 4, "error", 2)
    with pytest.raises(ValueError, match=match):
        packer.add_list([[1, 2], example])
    assert packer.examples_added == 0 and packer.pending_count == 0  # a failed call adds nothing
    with pytest.raises(UserError, match=match):
        list(pack_sequences([[1, 2], example], 8))


# --------------------------------------------------------------------------------------------
# The finetune's data, streamed from a file into the packer and a store on disk
# --------------------------------------------------------------------------------------------


def _chat_rows(n, seed=0):
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    rows = []
    for i in range(n):
        prompt = " ".join(rng.choice(words, rng.integers(1, 30)))
        response = " ".join(rng.choice(words, rng.integers(1, 60)))
        if i % 7 == 3:
            rows.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response},
                                      {"role": "user", "content": "more"}, {"role": "assistant", "content": "done"}]})
        else:
            rows.append({"prompt": prompt, "response": response})
    return rows


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_streamed_finetune_rows_equal_packing_the_whole_file(tmp_path, tiny_model_dir, fmt, monkeypatch):
    import json

    from refteacher.engine.data.chat_examples import encode_example
    from refteacher.engine.finetune import dataset
    from refteacher.engine.modeling.loading import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    rows = _chat_rows(300)
    path = tmp_path / f"rows.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        pq.write_table(pa.Table.from_pylist([{"prompt": r.get("prompt"), "response": r.get("response"),
                                              "messages": r.get("messages")} for r in rows]), path)
    max_len = 64
    # Not streamed: every row encoded, the ones with a response token kept, the list packed at once.
    examples = [encode_example(tokenizer, r, max_tokens=max_len) for r in rows]
    examples = [e for e in examples if any(y != -100 for y in e[1][1:])]
    expected = list(pack_sequences(examples, max_len, overflow="truncate"))
    # Streamed: small encode batches and small store writes, so both cut the stream many times.
    monkeypatch.setattr(dataset, "ENCODE_BATCH_ROWS", 7)
    monkeypatch.setattr(dataset, "_WRITE_TOKENS", 500)
    store = dataset.build_packed_rows(tokenizer, path, max_len, tmp_path / "packed")
    assert 0 < len(examples) < len(rows)  # some rows lost their response to max_len and were dropped
    assert store.manifest["rows"] == len(rows) and store.manifest["examples"] == len(examples)
    assert store.manifest["dropped"] == len(rows) - len(examples)
    assert len(store) == len(expected) and store.manifest["tokens"] == sum(r.num_tokens for r in expected)
    for i, row in enumerate(expected):
        assert store[i] == row
    assert store[-1] == expected[-1]
    with pytest.raises(IndexError):
        store[len(store)]
    import pickle

    shipped = pickle.dumps(store)  # what a DataLoader worker gets: the folder, not the rows
    assert len(shipped) < 500 and pickle.loads(shipped)[3] == expected[3]
    # A second build with the same input and settings reuses the store; another max_len rebuilds it.
    stamp = (tmp_path / "packed" / "input_ids.bin").stat().st_mtime_ns
    again = dataset.build_packed_rows(tokenizer, path, max_len, tmp_path / "packed")
    assert len(again) == len(store) and (tmp_path / "packed" / "input_ids.bin").stat().st_mtime_ns == stamp
    rebuilt = dataset.build_packed_rows(tokenizer, path, 2 * max_len, tmp_path / "packed")
    assert rebuilt.manifest["max_len"] == 2 * max_len


def test_streamed_finetune_rows_report_bad_rows(tmp_path, tiny_model_dir):
    from refteacher.engine.finetune.dataset import build_packed_rows
    from refteacher.engine.modeling.loading import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "only a prompt"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl row 3: a training row needs string 'prompt' and 'response'"):
        build_packed_rows(tokenizer, bad, 64, tmp_path / "packed")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a", "response": "b"}\n{"prompt": \n')
    with pytest.raises(UserError, match=r"row 2 \(line 2\): not valid JSON"):
        build_packed_rows(tokenizer, broken, 64, tmp_path / "packed")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(UserError, match="holds no rows to train on"):
        build_packed_rows(tokenizer, empty, 64, tmp_path / "packed")
    assert not (tmp_path / "packed").exists() and not list(tmp_path.glob(".packed.tmp-*"))  # nothing half-built


def test_pretokenised_parquet_is_packed_from_its_arrow_columns(tmp_path, tiny_model_dir, monkeypatch):
    from refteacher.engine.finetune import dataset
    from refteacher.engine.modeling.loading import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    lengths = np.random.default_rng(14).integers(1, 150, 500)
    examples = make_examples(lengths, seed=15, with_labels=True)
    path = tmp_path / "tokens.parquet"
    pq.write_table(pa.table({"input_ids": _list_column([e[0] for e in examples]),
                             "labels": _list_column([e[1] for e in examples], value_type=pa.int64())}), path)
    monkeypatch.setattr(dataset, "PARQUET_BATCH_ROWS", 64)
    store = dataset.build_packed_rows(tokenizer, path, 100, tmp_path / "packed")
    expected = list(pack_sequences(examples, 100, overflow="truncate"))
    assert store.manifest["rows"] == store.manifest["examples"] == 500 and len(store) == len(expected)
    assert all(store[i] == row for i, row in enumerate(expected))
    # Without labels every token takes loss; ids beyond the vocabulary and bad rows are UserErrors.
    pq.write_table(pa.table({"input_ids": _list_column([e[0] for e in examples])}), path)
    store = dataset.build_packed_rows(tokenizer, path, 100, tmp_path / "plain")
    assert all(store[i] == row for i, row in enumerate(pack_sequences([e[0] for e in examples], 100,
                                                                         overflow="truncate")))
    pq.write_table(pa.table({"input_ids": _list_column([[1, 2], [3, len(tokenizer)]])}), path)
    with pytest.raises(UserError, match=r"token id \d+ in rows 1-2 is outside the tokenizer's vocabulary"):
        dataset.build_packed_rows(tokenizer, path, 100, tmp_path / "bad")
    pq.write_table(pa.table({"input_ids": _list_column([[1, 2], []])}), path)
    with pytest.raises(UserError, match=r"tokens.parquet: example 1 is empty.*\(example i is row i \+ 1 of the file\)"):
        dataset.build_packed_rows(tokenizer, path, 100, tmp_path / "bad")
