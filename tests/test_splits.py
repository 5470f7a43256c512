"""Reading a source in splits gives the rows, ids and line numbers of a whole read (data/splits.py)."""
from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from refteacher.engine.data import splits as splits_module
from refteacher.engine.data.readers import iter_raw_rows, open_source
from refteacher.engine.data.splits import ID_COLUMN, plan_splits, raw_rows, read_split, record_columns, row_bytes
from refteacher.engine.errors import UserError


def split_rows(source, parts: int, block_rows: int = 3) -> list[tuple[int, int, object]]:
    """(id, line, payload) of every row, read split by split in block_rows tables."""
    out = []
    for split in plan_splits(source, parts):
        for table in read_split(source, split, block_rows):
            assert table.num_rows <= block_rows
            out += [(r.id, r.line, r.payload) for r in raw_rows(table)]
    return out


def whole_rows(source) -> list[tuple[int, int, object]]:
    return [(r.id, r.line, r.payload) for r in iter_raw_rows(source)]


@pytest.mark.parametrize("scan_chunk", [7, 1 << 24])  # cuts found across the planner's read chunks, or inside one
def test_jsonl_splits_keep_line_numbers(tmp_path, monkeypatch, scan_chunk):
    monkeypatch.setattr(splits_module, "MIN_SPLIT_BYTES", 1)
    monkeypatch.setattr(splits_module, "_SCAN_CHUNK", scan_chunk)
    lines = []
    for i in range(40):
        lines.append(json.dumps({"prompt": f"row {i} " + "é" * (i % 7)}, ensure_ascii=False).encode())
        if i % 6 == 2:
            lines.append(b"  \t")  # blank: no row, but a line
        if i % 11 == 4:
            lines.append(b"{broken")
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\r\n".join(lines))  # CRLF, and no newline after the last row
    source = open_source(str(path))
    whole = whole_rows(source)
    for parts in (1, 2, 3, 7, 40, 500):
        splits = plan_splits(source, parts)
        assert len(splits) <= parts and splits[0].start == 0
        assert all(a.stop == b.start for a, b in zip(splits, splits[1:])) and splits[-1].stop == path.stat().st_size
        assert split_rows(source, parts) == whole, parts


def test_small_jsonl_is_one_split_and_gzip_is_never_cut(tmp_path):
    path = tmp_path / "in.jsonl.gz"
    with gzip.open(path, "wb") as f:
        f.write(b"".join(json.dumps({"prompt": f"p{i}"}).encode() + b"\n" for i in range(50)))
    source = open_source(str(path))
    assert len(plan_splits(source, 8)) == 1
    assert split_rows(source, 8) == whole_rows(source)
    plain = tmp_path / "in.jsonl"
    plain.write_text('{"prompt": "a"}\n' * 10)
    assert len(plan_splits(open_source(str(plain)), 8)) == 1  # smaller than MIN_SPLIT_BYTES
    assert row_bytes(open_source(str(plain))) == 16 and row_bytes(source) == pytest.approx(17.8)  # gzip: unpacked


def test_a_json_array_file_is_refused_as_in_a_whole_read(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('\n[{"prompt": "a"},\n{"prompt": "b"}]\n')
    source = open_source(str(path))
    with pytest.raises(UserError, match="JSON array"):
        split_rows(source, 1)


def test_parquet_splits_are_runs_of_row_groups(tmp_path):
    path = tmp_path / "in.parquet"
    table = pa.table({"prompt": [f"p{i}" for i in range(30)], "n": list(range(30)),
                      "tags": [[str(i)] * (i % 3) for i in range(30)]})
    pq.write_table(table, path, row_group_size=7)
    source = open_source(str(path))
    splits = plan_splits(source, 3)
    assert [(s.start, s.stop, s.first_id, s.rows) for s in splits] == [(0, 2, 1, 14), (2, 4, 15, 14), (4, 5, 29, 2)]
    assert split_rows(source, 3, block_rows=4) == whole_rows(source)
    assert 1 < row_bytes(source) < 100
    first = next(read_split(source, splits[1], 100))
    assert record_columns(first).schema == table.schema and first.column(ID_COLUMN).to_pylist()[0] == 15


def test_empty_inputs_and_other_formats(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert split_rows(open_source(str(empty)), 4) == []
    csv = tmp_path / "in.csv"
    csv.write_text("prompt\nhello\n")
    with pytest.raises(UserError, match="JSONL or Parquet"):
        plan_splits(open_source(str(csv)), 2)


def test_a_table_from_elsewhere_numbers_its_rows():
    rows = raw_rows(pa.table({"prompt": ["a", "b"]}))
    assert [(r.id, r.line, r.payload) for r in rows] == [(1, 1, {"prompt": "a"}), (2, 2, {"prompt": "b"})]
