"""The streaming packer: C++ against its Python twin, row invariants, overflow, errors, streaming, collate."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refteacher.engine.data import _packer
from refteacher.engine.data.packing import (
    PackedRow,
    collate_packed,
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
    packer = _packer.Packer(8, 4, "error", 2)
    with pytest.raises(ValueError, match="fit in int32"):
        packer.add_many(np.array([5, -big - 1], dtype=np.int64), np.array([0, 1, 2], dtype=np.int64))
    assert packer.examples_added == 0 and packer.pending_count == 0  # a failed call adds nothing
    packer.add(np.array([big - 1, -big], dtype=np.int64))  # the int32 extremes are fine
    packer.flush()
    ids = packer.pop_ready()[0]
    assert ids.dtype == np.int64 and ids.tolist() == [big - 1, -big]


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
