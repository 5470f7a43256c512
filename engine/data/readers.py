"""Streaming readers for user datasets: every input row becomes prompts to score or a rejection.

Formats (picked from the file name, or with ``fmt``):

- ``jsonl`` (``.jsonl``, ``.ndjson``, ``.json``; ``.gz`` too): one JSON object a line. Blank lines
  are not rows. A line that is not UTF-8, not JSON or not an object is rejected.
- ``csv`` (``.csv``; ``.tsv`` is tab-separated): a header line, then one row per record.
- ``parquet`` (``.parquet``, ``.pq``): streamed in record batches with pyarrow.
- ``hf``: a Hugging Face dataset, ``hf:NAME`` (or ``--format hf`` with NAME), streamed with the
  ``datasets`` package (an optional dependency).

Stable row ids. ``Row.id`` is the row's 1-based position in its source: the line number for
JSONL (so ``sed -n IDp file`` shows it), the record number for CSV (header excluded) and the row
number for Parquet and Hugging Face datasets. Ids grow with input order, so outputs of shards
merge back by id. ``Row.line`` is where a reader would look for the row: the line number for text
formats (for CSV the line the record starts on), the row number otherwise.

Prompts of a row. A chat row ``{"messages": [{"role", "content"}, ...]}`` gives one prompt per
user turn: the conversation up to and including that turn (the filter scores each and keeps the
maximum). Otherwise the prompt field (default ``prompt``) must hold a non-empty string. A row
with no prompt, an empty prompt, or malformed messages is rejected with the reason.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import pyarrow.parquet as pq

from refteacher.engine.errors import UserError

FORMATS = ("jsonl", "csv", "parquet", "hf")
_SUFFIX_FORMATS = {
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
    ".csv": "csv", ".tsv": "csv",
    ".parquet": "parquet", ".pq": "parquet",
}
_PARQUET_BATCH_ROWS = 1024

Prompt = str | list[dict]


@dataclass
class Row:
    """One input row: its stable id, the parsed record and its prompts, or why it was rejected.

    ``prompts`` is non-empty exactly when ``reason`` is None. ``record`` is the row as read (a dict)
    or None when it could not be read at all; then ``raw`` holds its text (bad bytes replaced).
    """

    id: int
    line: int
    record: dict | None
    prompts: list[Prompt] = field(default_factory=list)
    reason: str | None = None
    raw: str | None = None


@dataclass(frozen=True)
class RawRow:
    """A row as it comes off the reader, before its prompts are extracted (cheap to skip)."""

    ordinal: int  # 0-based position among the rows of the source
    id: int
    line: int
    payload: Any  # bytes (jsonl), dict of str (csv), dict (parquet / hf)


@dataclass(frozen=True)
class PromptFields:
    """Which fields hold the prompt: a chat ``messages`` list first, else a string ``prompt``."""

    prompt: str = "prompt"
    messages: str = "messages"


class RowRejected(Exception):
    """Raised while reading a row that cannot be scored; the message is the reason."""


# --------------------------------------------------------------------------------------------
# Opening a source
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """A dataset to stream: a file path (with its format) or a Hugging Face dataset name."""

    location: str
    fmt: str
    split: str = "train"
    hf_config: str | None = None

    def fingerprint(self) -> dict[str, Any]:
        """Return what identifies this input for resuming: path, size and mtime (or HF name)."""
        if self.fmt == "hf":
            return {"hf": self.location, "config": self.hf_config, "split": self.split}
        stat = Path(self.location).stat()
        return {"path": str(Path(self.location).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}

    def num_rows(self) -> int | None:
        """Return the number of rows when it is known without reading them (Parquet), else None."""
        if self.fmt == "parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(self.location).metadata.num_rows
        return None


def open_source(location: str | os.PathLike, fmt: str | None = None, *, split: str = "train",
                hf_config: str | None = None) -> Source:
    """Return a Source for a file path or ``hf:NAME``; UserError if missing, unreadable or unknown format."""
    text = str(location)
    if fmt is not None and fmt not in FORMATS:
        raise UserError(f"unknown input format {fmt!r}; use one of {', '.join(FORMATS)}")
    if text.startswith("hf:") or fmt == "hf":
        name = text[3:] if text.startswith("hf:") else text
        if not name:
            raise UserError("give the Hugging Face dataset as hf:NAME, e.g. hf:tatsu-lab/alpaca")
        return Source(name, "hf", split=split, hf_config=hf_config)
    path = Path(text).expanduser()
    if not path.exists():
        raise UserError(f"input {text!r} does not exist; pass a JSONL, CSV or Parquet file, or hf:NAME for a "
                        "Hugging Face dataset")
    if not path.is_file():
        raise UserError(f"input {text!r} is not a file; pass a JSONL, CSV or Parquet file")
    if not os.access(path, os.R_OK):
        raise UserError(f"input {text!r} is not readable (permissions)")
    if fmt is None:
        suffixes = [s.lower() for s in path.suffixes]
        if suffixes and suffixes[-1] == ".gz":
            suffixes = suffixes[:-1]
        fmt = _SUFFIX_FORMATS.get(suffixes[-1] if suffixes else "")
        if fmt is None:
            raise UserError(f"cannot tell the format of {text!r} from its name; name it .jsonl, .csv or .parquet, "
                            "or pass --format jsonl|csv|parquet")
    return Source(str(path), fmt, split=split, hf_config=hf_config)


# --------------------------------------------------------------------------------------------
# Raw rows (cheap: no prompt extraction), per format
# --------------------------------------------------------------------------------------------


def iter_raw_rows(source: Source, *, wanted: Callable[[int], bool] | None = None) -> Iterator[RawRow]:
    """Yield the rows of ``source`` in order as RawRow; rows with ``wanted(ordinal)`` False are skipped.

    Skipped rows are counted (ordinals and ids stay stable) but not decoded where the format allows.
    """
    readers = {"jsonl": _jsonl_rows, "csv": _csv_rows, "parquet": _parquet_rows, "hf": _hf_rows}
    return readers[source.fmt](source, wanted or (lambda ordinal: True))


def _open_binary(path: str):
    if path.lower().endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


def _jsonl_rows(source: Source, wanted: Callable[[int], bool]) -> Iterator[RawRow]:
    with _open_binary(source.location) as f:
        for ordinal, (line_number, line) in enumerate(jsonl_lines(f, source.location)):
            if wanted(ordinal):
                yield RawRow(ordinal, line_number, line_number, line)


def jsonl_lines(lines: Iterable[bytes], location: str, first_line: int = 1) -> Iterator[tuple[int, bytes]]:
    """Yield (line number, line) for the rows of JSON Lines: every line that is not blank.

    ``lines`` are raw lines (a binary file, or part of one starting at line ``first_line``). At the
    start of a file (``first_line`` 1), a first row that opens a JSON array is a UserError.
    """
    check_array = first_line == 1
    for line_number, line in enumerate(lines, start=first_line):
        if not line.strip():
            continue
        if check_array and line.lstrip(b"\xef\xbb\xbf \t").startswith(b"["):
            raise UserError(f"{location} looks like one JSON array, not JSON Lines; write one object "
                            "per line (e.g. `jq -c '.[]' in.json > in.jsonl`)")
        check_array = False
        yield line_number, line


def _csv_rows(source: Source, wanted: Callable[[int], bool]) -> Iterator[RawRow]:
    delimiter = "\t" if ".tsv" in [s.lower() for s in Path(source.location).suffixes] else ","
    with _open_binary(source.location) as binary:
        # surrogateescape keeps bad bytes visible as lone surrogates so one bad row is rejected alone
        text = io.TextIOWrapper(binary, encoding="utf-8-sig", errors="surrogateescape", newline="")
        reader = csv.reader(text, delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            raise UserError(f"{source.location}: cannot read the CSV header ({err})") from None
        if any(_has_surrogates(h) for h in header):
            raise UserError(f"{source.location}: the CSV header is not valid UTF-8; re-save the file as UTF-8")
        ordinal = 0
        start_line = reader.line_num + 1
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as err:
                fields = err  # a malformed record: reported as that row's rejection
            if isinstance(fields, list) and not fields:  # blank line
                start_line = reader.line_num + 1
                continue
            if wanted(ordinal):
                yield RawRow(ordinal, ordinal + 1, start_line, (header, fields))
            ordinal += 1
            start_line = reader.line_num + 1


def _parquet_rows(source: Source, wanted: Callable[[int], bool]) -> Iterator[RawRow]:
    try:
        parquet = pq.ParquetFile(source.location)
    except Exception as err:  # pyarrow raises its own error types for corrupt files
        raise UserError(f"{source.location} is not a readable Parquet file ({err})") from None
    ordinal = 0
    for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS):
        count = batch.num_rows
        if not any(wanted(i) for i in range(ordinal, ordinal + count)):
            ordinal += count
            continue
        for record in batch.to_pylist():
            if wanted(ordinal):
                yield RawRow(ordinal, ordinal + 1, ordinal + 1, record)
            ordinal += 1


def _hf_rows(source: Source, wanted: Callable[[int], bool]) -> Iterator[RawRow]:
    try:
        import datasets
    except ImportError:
        raise UserError("reading a Hugging Face dataset needs the `datasets` package: `pip install datasets` "
                        "(or export the dataset to JSONL / Parquet and pass the file)") from None
    try:
        dataset = datasets.load_dataset(source.location, source.hf_config, split=source.split, streaming=True)
    except Exception as err:  # datasets raises many types (missing name, no network, bad split)
        raise UserError(f"could not open Hugging Face dataset {source.location!r} split {source.split!r} "
                        f"({type(err).__name__}: {err})") from None
    for ordinal, record in enumerate(dataset):
        if wanted(ordinal):
            yield RawRow(ordinal, ordinal + 1, ordinal + 1, dict(record))


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


# --------------------------------------------------------------------------------------------
# From a raw row to a Row (record + prompts, or a rejection)
# --------------------------------------------------------------------------------------------


def parse_row(raw: RawRow, fields: PromptFields = PromptFields()) -> Row:
    """Decode a RawRow and extract its prompts; never raises for bad data (it returns a rejection)."""
    record, problem, text = _decode(raw)
    if problem is not None:
        return Row(raw.id, raw.line, record, reason=problem, raw=text if record is None else None)
    try:
        prompts = extract_prompts(record, fields)
    except RowRejected as why:
        return Row(raw.id, raw.line, record, reason=str(why))
    return Row(raw.id, raw.line, record, prompts=prompts)


def read_records(location: str | os.PathLike, fmt: str | None = None, *, split: str = "train") -> Iterator[tuple[int, dict]]:
    """Yield ``(row id, record)`` for every row of a file or ``hf:NAME``, strictly: where the filter
    rejects a malformed row and goes on, this raises a UserError naming the row (for inputs that
    must be whole, such as the teacher's prompt sets). Same formats and ids as ``open_source``."""
    source = open_source(location, fmt, split=split)
    for raw in iter_raw_rows(source):
        record, problem, _ = _decode(raw)
        if problem is not None:
            raise UserError(f"{location} row {raw.id} (line {raw.line}): {problem}")
        yield raw.id, record


def _decode(raw: RawRow) -> tuple[dict | None, str | None, str | None]:
    """(record, problem, raw text) of a RawRow in any format: the record, or why it cannot be read."""
    if isinstance(raw.payload, bytes):
        return _decode_json_line(raw.payload)
    if isinstance(raw.payload, tuple):
        return _decode_csv_record(*raw.payload)
    return raw.payload, None, None


def _decode_json_line(line: bytes) -> tuple[dict | None, str | None, str | None]:
    line = line.rstrip(b"\r\n")
    if line.startswith(b"\xef\xbb\xbf"):
        line = line[3:]
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as err:
        return None, f"invalid UTF-8 at byte {err.start}", line.decode("utf-8", errors="replace")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        return None, f"not valid JSON ({err.msg} at column {err.colno})", text
    if not isinstance(value, dict):
        return None, f"a row must be a JSON object, got {type(value).__name__}", text
    return value, None, None


def _decode_csv_record(header: list[str], fields: list[str] | Exception) -> tuple[dict | None, str | None, str | None]:
    if isinstance(fields, Exception):
        return None, f"malformed CSV record ({fields})", ""
    text = ",".join(fields)
    if any(_has_surrogates(f) for f in fields):
        return None, "invalid UTF-8", text.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="replace")
    if len(fields) != len(header):
        return None, f"has {len(fields)} fields but the header has {len(header)}", text
    return dict(zip(header, fields)), None, None


def extract_prompts(record: Mapping[str, Any], fields: PromptFields = PromptFields()) -> list[Prompt]:
    """Return the prompts to score for one record; raise RowRejected with the reason if there are none.

    A chat record gives one message list per user turn (the conversation up to that turn); a plain
    record gives its prompt string.
    """
    if fields.messages in record and record[fields.messages] is not None:
        return _chat_prompts(record[fields.messages], fields.messages)
    if fields.prompt not in record or record[fields.prompt] is None:
        raise RowRejected(f"no {fields.prompt!r} field (nor {fields.messages!r}); "
                          f"fields present: {', '.join(map(str, record)) or 'none'}")
    prompt = record[fields.prompt]
    if not isinstance(prompt, str):
        raise RowRejected(f"{fields.prompt!r} must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise RowRejected(f"empty prompt in {fields.prompt!r}")
    return [prompt]


def _chat_prompts(messages: Any, name: str) -> list[Prompt]:
    if isinstance(messages, str):  # CSV cells hold JSON text
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError:
            raise RowRejected(f"{name!r} is a string that is not a JSON message list") from None
    if not isinstance(messages, list) or not messages:
        raise RowRejected(f"{name!r} must be a non-empty list of {{role, content}} messages")
    turns: list[dict] = []
    prompts: list[Prompt] = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise RowRejected(f"message {index} of {name!r} needs a string 'role'")
        content = _message_text(message.get("content"))
        if content is None:
            raise RowRejected(f"message {index} of {name!r} needs string 'content' (or a list of text parts)")
        turns.append({"role": message["role"], "content": content})
        if message["role"] == "user":
            if not content.strip():
                raise RowRejected(f"empty user message (message {index} of {name!r})")
            prompts.append(list(turns))
    if not prompts:
        raise RowRejected(f"no user message in {name!r}")
    return prompts


def _message_text(content: Any) -> str | None:
    """Return a message's text: a string, or the joined text parts of an OpenAI-style part list."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif isinstance(part, str):
                texts.append(part)
        return "\n".join(texts) if texts else None
    return None


def iter_rows(source: Source, fields: PromptFields = PromptFields(),
              *, wanted: Callable[[int], bool] | None = None) -> Iterator[Row]:
    """Yield every (wanted) row of ``source`` as a Row, in input order."""
    for raw in iter_raw_rows(source, wanted=wanted):
        yield parse_row(raw, fields)
