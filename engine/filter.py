"""The streaming refusal filter: split a user dataset into kept, flagged and rejected rows.

Scoring. A prompt's score is the cosine similarity between the teacher's hidden state at the last
token of the rendered prompt (chat template with the generation prompt) after the teacher's
feature layer, and the teacher's refusal feature. A row is **flagged when its score >= the
threshold** (the teacher's calibrated one, or ``threshold=``), kept otherwise. A chat row is
scored once per user turn (the conversation up to that turn) and its score is the maximum.
A prompt longer than ``max_prompt_tokens`` is scored on its last tokens and marked ``_truncated``.

How it is fast. Rows stream in windows of ``window_rows`` rows (memory is bounded by the window).
A background thread reads, renders and tokenises the next window while the current one runs.
Inside a window the prompts are sorted by length and cut into batches of about
``batch_tokens`` padded tokens, so little padding is computed. The token prefix that every
prompt of a window shares (the chat template's system prompt: about half of a short prompt) runs
once per window, and its KV cache serves every batch of the window (``prompt_states.PrefixCache``).
The teacher runs only as far as its feature layer (no later layers, no LM head) under inference
mode, and the scores come from the fused gather + cosine kernel (``refusal_scores``). On CUDA with
flash-attn installed, each batch is instead packed into one sequence and run through flash-attn's
variable-length path (no padding at all, no prefix cache). Results are emitted in input order.

Determinism. Window k holds input rows k*W .. (k+1)*W-1, whatever the shard or resume point, and
the batches of a window depend only on its rows, so a resumed run and a sharded run compute each
score exactly as an uninterrupted single run does. ``--shard I/N`` takes windows k with
k mod N == I. Scores are written rounded to 6 decimals.

Output rows are the input rows unchanged plus ``_id`` (the stable row id, see ``data``) and
``_score`` (``_truncated: true`` when cut); rejected rows get ``_id``, ``_line``, ``_reason`` (and
``_raw``, the text, when the row could not be read at all). These keys overwrite input keys of the
same name.

Fails closed: a batch whose scoring raises (or yields a non-finite score) sends its rows to
rejected with the reason, never to kept.

Python API: ``score_prompts`` (a list of prompts -> scores), ``iter_verdicts`` (a stream of rows
-> ``Verdict`` per row, in input order) and ``run_filter`` (the whole job with output files,
checkpointing and report). The ``filter`` CLI command is ``add_cli``.
"""
from __future__ import annotations

import json
import math
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from refteacher.engine.data import Prompt, PromptFields, Row, Source, iter_raw_rows, open_source, parse_row
from refteacher.engine.errors import UserError
from refteacher.engine.models import decoder_module, forward_to_layer, forward_to_layers
from refteacher.engine.prompt_states import PrefixCache, cacheable_prefix
from refteacher.engine.prompts import encode_prompts, pad_token_id, right_pad
from refteacher.kernels.cosine import refusal_scores

OUTPUT_FILES = ("kept.jsonl", "flagged.jsonl", "rejected.jsonl")
DEFAULT_MAX_PROMPT_TOKENS = 2048
_DEFAULTS = {  # (batch_tokens, window_rows) per device type, picked by benchmarks/bench_filter.py
    "cpu": (8192, 1024),
    "cuda": (65536, 16384),
}
_QUEUE_WINDOWS = 2  # prepared windows waiting ahead of the forward pass


# --------------------------------------------------------------------------------------------
# Options and results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FilterOptions:
    """How to filter. ``None`` means the device default (see ``_DEFAULTS``) or the teacher's threshold.

    ``shard`` is (index, count). ``packed`` None = packed varlen batches when on CUDA with flash-attn.
    """

    threshold: float | None = None
    batch_tokens: int | None = None
    window_rows: int | None = None
    max_prompt_tokens: int | None = DEFAULT_MAX_PROMPT_TOKENS
    shard: tuple[int, int] = (0, 1)
    fields: PromptFields = PromptFields()
    packed: bool | None = None

    def resolved(self, device: torch.device) -> "FilterOptions":
        """Return a copy with the device defaults filled in; UserError for values out of range."""
        batch_default, window_default = _DEFAULTS.get(device.type, _DEFAULTS["cpu"])
        batch_tokens = self.batch_tokens if self.batch_tokens is not None else batch_default
        window_rows = self.window_rows if self.window_rows is not None else window_default
        if batch_tokens < 1:
            raise UserError(f"--batch-tokens must be at least 1, got {batch_tokens}")
        if window_rows < 1:
            raise UserError(f"--window-rows must be at least 1, got {window_rows}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise UserError(f"--max-prompt-tokens must be at least 1, got {self.max_prompt_tokens}")
        index, count = self.shard
        if count < 1 or not 0 <= index < count:
            raise UserError(f"shard {index}/{count} is invalid: use I/N with 0 <= I < N")
        if self.threshold is not None and not math.isfinite(self.threshold):
            raise UserError(f"--threshold must be a finite number, got {self.threshold}")
        packed = self.packed if self.packed is not None else _flash_attn_available(device)
        return FilterOptions(self.threshold, batch_tokens, window_rows, self.max_prompt_tokens, self.shard,
                             self.fields, packed)


@dataclass
class Verdict:
    """The outcome for one input row.

    ``status`` is ``kept``, ``flagged`` or ``rejected``; ``score`` the row's score (None when
    rejected); ``reason`` why it was rejected; ``record`` the row as read (None if unreadable, then
    ``raw`` holds its text); ``tokens`` the prompt tokens scored.
    """

    id: int
    line: int
    status: str
    score: float | None = None
    truncated: bool = False
    reason: str | None = None
    record: dict | None = None
    raw: str | None = None
    tokens: int = 0

    def output_record(self) -> dict[str, Any]:
        """Return the row as written to its output file: the record unchanged plus ``_id``, ``_score``..."""
        out: dict[str, Any] = dict(self.record) if self.record is not None else {}
        out["_id"] = self.id
        if self.status == "rejected":
            out["_line"] = self.line
            out["_reason"] = self.reason
            if self.record is None:
                out["_raw"] = self.raw
            return out
        out["_score"] = self.score
        if self.truncated:
            out["_truncated"] = True
        return out

    def output_line(self) -> bytes:
        """Return the output record as one JSON line (UTF-8, newline-terminated)."""
        try:
            return (json.dumps(self.output_record(), ensure_ascii=False, default=str) + "\n").encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates from \\ud800-style escapes: keep them escaped
            return (json.dumps(self.output_record(), ensure_ascii=True, default=str) + "\n").encode("ascii")


@dataclass
class WindowResult:
    """The verdicts of one window, in input order, with its token counts."""

    index: int
    verdicts: list[Verdict]
    prompts: int = 0
    tokens: int = 0
    padded_tokens: int = 0


# --------------------------------------------------------------------------------------------
# Preparing a window: tokenise, sort by length, batch, pad (runs on the background thread)
# --------------------------------------------------------------------------------------------


@dataclass
class _Batch:
    units: list[int]  # indices into the window's units
    input_ids: torch.Tensor  # [B, T] long, or [1, sum] when packed
    attention_mask: torch.Tensor | None  # [B, T] long; None when packed, or equal lengths with no prefix
    last_index: torch.Tensor  # [B] long: each unit's last token (in the packed row when packed)
    position_ids: torch.Tensor | None = None  # [1, sum] long when packed
    tokens: int = 0
    padded_tokens: int = 0


@dataclass
class _Window:
    index: int
    rows: list[Row]
    unit_rows: list[int] = field(default_factory=list)  # unit -> row position in the window
    unit_truncated: list[bool] = field(default_factory=list)
    batches: list[_Batch] = field(default_factory=list)
    prefix: list[int] = field(default_factory=list)  # token ids every unit starts with, cut from the batches


def _tokenise(rows: list[Row], tokenizer, max_tokens: int | None) -> tuple[list[int], list[list[int]], list[bool]]:
    """Encode every prompt of the readable rows; rows that fail to render get a reason instead.

    Returns (unit -> row position, token ids per unit, truncated per unit).
    """
    owners = [pos for pos, row in enumerate(rows) if row.reason is None for _ in row.prompts]
    prompts = [p for row in rows if row.reason is None for p in row.prompts]
    try:
        ids, truncated = encode_prompts(tokenizer, prompts, max_tokens=max_tokens)
    except Exception:  # one bad row (template error, odd text): find it row by row
        owners, ids, truncated = [], [], []
        for pos, row in enumerate(rows):
            if row.reason is not None:
                continue
            try:
                row_ids, row_truncated = encode_prompts(tokenizer, row.prompts, max_tokens=max_tokens)
            except Exception as err:
                row.reason = f"could not render or tokenise the prompt ({type(err).__name__}: {err})"
                continue
            owners += [pos] * len(row_ids)
            ids += row_ids
            truncated += row_truncated
    for unit, seq in enumerate(ids):
        if not seq:
            rows[owners[unit]].reason = "the prompt rendered to no tokens"
    keep = [u for u in range(len(ids)) if rows[owners[u]].reason is None]
    return [owners[u] for u in keep], [ids[u] for u in keep], [truncated[u] for u in keep]


def _length_batches(lengths: Sequence[int], batch_tokens: int, max_waste: float = 0.1) -> list[list[int]]:
    """Group unit indices, sorted by length, into batches of at most ``batch_tokens`` padded tokens.

    A batch is also closed early, once it holds a quarter of ``batch_tokens``, when adding the next
    (longer) unit would make more than ``max_waste`` of its tokens padding. A unit longer than
    ``batch_tokens`` gets a batch of its own. Deterministic (ties broken by index).
    """
    order = sorted(range(len(lengths)), key=lambda u: (lengths[u], u))
    batches: list[list[int]] = []
    current: list[int] = []
    real = 0
    for unit in order:
        width = lengths[unit]
        padded = (len(current) + 1) * width
        too_big = padded > batch_tokens
        wasteful = len(current) * width >= batch_tokens // 4 and padded - (real + width) > max_waste * padded
        if current and (too_big or wasteful):
            batches.append(current)
            current, real = [], 0
        current.append(unit)
        real += width
    if current:
        batches.append(current)
    return batches


def _packed_batch(units: list[int], seqs: list[list[int]]) -> _Batch:
    """Concatenate sequences into one row [1, sum] with per-sequence position ids (varlen attention)."""
    flat: list[int] = []
    positions: list[int] = []
    last: list[int] = []
    for seq in seqs:
        flat += seq
        positions += range(len(seq))
        last.append(len(flat) - 1)
    return _Batch(
        units,
        torch.tensor([flat], dtype=torch.long),
        None,
        torch.tensor(last, dtype=torch.long),
        position_ids=torch.tensor([positions], dtype=torch.long),
        tokens=len(flat),
        padded_tokens=len(flat),
    )


def _prepare_window(index: int, rows: list[Row], tokenizer, options: FilterOptions, pin: bool) -> _Window:
    """Tokenise a window's rows and build its length-sorted, padded (or packed) batches on CPU."""
    window = _Window(index, rows)
    owners, ids, truncated = _tokenise(rows, tokenizer, options.max_prompt_tokens)
    window.unit_rows, window.unit_truncated = owners, truncated
    pad_id = pad_token_id(tokenizer)
    max_waste = 1.0 if options.packed else 0.1  # packed batches hold no padding at all
    window.prefix = [] if options.packed else cacheable_prefix(ids)
    shared = len(window.prefix)
    for units in _length_batches([len(s) - shared for s in ids], options.batch_tokens, max_waste):
        seqs = [ids[u][shared:] for u in units]
        if options.packed:
            batch = _packed_batch(units, seqs)
        else:
            input_ids, attention_mask, last_index = right_pad(seqs, pad_id)
            if not shared and bool(attention_mask.all()):
                attention_mask = None  # equal lengths, no prefix: plain causal attention, no mask to build
            batch = _Batch(units, input_ids, attention_mask, last_index,
                           tokens=sum(len(s) + shared for s in seqs), padded_tokens=input_ids.numel())
        if pin:
            batch.input_ids = batch.input_ids.pin_memory()
        window.batches.append(batch)
    return window


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


def _flash_attn_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def _use_flash_attention(model) -> None:
    """Switch a loaded model to flash-attn 2 (needed for packed batches); UserError if it cannot."""
    setter = getattr(model, "set_attn_implementation", None)
    if setter is None:
        raise UserError("this transformers version cannot switch attention; pass --no-packed")
    try:
        setter("flash_attention_2")
    except (ImportError, ValueError) as err:
        raise UserError(f"packed batches need flash-attn 2 ({err}); install flash-attn or pass --no-packed") from None


def _prefix_cache(model, window: _Window, layer: int) -> PrefixCache | None:
    """The KV cache of the window's shared prefix up to ``layer`` (None without one). May raise."""
    return PrefixCache(model, window.prefix, layer) if window.prefix else None


def _score_batch(model, feature: torch.Tensor, layer: int, batch: _Batch, device: torch.device,
                 prefix: PrefixCache | None = None) -> list[float]:
    """Run one batch to the feature layer and return its scores (float per unit). May raise.

    ``prefix``: the cache of the tokens cut from the front of every row of a padded batch.
    """
    input_ids = batch.input_ids.to(device, non_blocking=True)
    mask = batch.attention_mask.to(device, non_blocking=True) if batch.attention_mask is not None else None
    last = batch.last_index.to(device, non_blocking=True)
    if batch.position_ids is None:
        decoder_kwargs = None
        if prefix is not None:  # a window with a prefix keeps every batch's mask
            mask, decoder_kwargs = prefix.continue_with(mask)
        hidden = forward_to_layers(model, input_ids, mask, [layer], decoder_kwargs=decoder_kwargs)[0]
        scores = refusal_scores(hidden, feature, last)
    else:
        position_ids = batch.position_ids.to(device, non_blocking=True)

        def add_position_ids(module, args, kwargs):
            kwargs["position_ids"] = position_ids
            return args, kwargs

        handle = decoder_module(model).register_forward_pre_hook(add_position_ids, with_kwargs=True)
        try:
            hidden = forward_to_layer(model, input_ids, None, layer)  # [1, sum, H]
        finally:
            handle.remove()
        scores = refusal_scores(hidden[0].index_select(0, last), feature, None)
    values = scores.float().cpu().tolist()
    if not all(math.isfinite(v) for v in values):
        raise FloatingPointError("the model produced a non-finite score")
    return values


def _score_window(teacher, window: _Window, threshold: float, device: torch.device) -> WindowResult:
    """Score every batch of a prepared window and return the rows' verdicts in input order."""
    unit_scores: list[float | None] = [None] * len(window.unit_rows)
    row_failure: dict[int, str] = {}
    result = WindowResult(window.index, [])
    prefix: PrefixCache | Exception | None
    try:
        prefix = _prefix_cache(teacher.model, window, teacher.layer)
    except Exception as err:  # every batch of the window needs it: each fails with this error
        prefix = err
    for batch in window.batches:
        try:
            if isinstance(prefix, Exception):
                raise prefix
            values = _score_batch(teacher.model, teacher.feature, teacher.layer, batch, device, prefix)
        except Exception as err:  # fail closed: these rows go to rejected, never to kept
            reason = f"scoring failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
            for unit in batch.units:
                row_failure.setdefault(window.unit_rows[unit], reason)
            continue
        for unit, value in zip(batch.units, values):
            unit_scores[unit] = value
        result.prompts += len(batch.units)
        result.tokens += batch.tokens
        result.padded_tokens += batch.padded_tokens
    row_scores: dict[int, float] = {}
    row_truncated: dict[int, bool] = {}
    row_tokens: dict[int, int] = {}
    for unit, pos in enumerate(window.unit_rows):
        if unit_scores[unit] is not None:
            row_scores[pos] = max(row_scores.get(pos, -math.inf), unit_scores[unit])
        row_truncated[pos] = row_truncated.get(pos, False) or window.unit_truncated[unit]
    for pos, row in enumerate(window.rows):
        reason = row.reason or row_failure.get(pos)
        if reason is not None:
            verdict = Verdict(row.id, row.line, "rejected", reason=reason, record=row.record, raw=row.raw)
        else:
            score = round(row_scores[pos], 6)
            status = "flagged" if score >= threshold else "kept"
            verdict = Verdict(row.id, row.line, status, score=score, truncated=row_truncated.get(pos, False),
                              record=row.record)
        result.verdicts.append(verdict)
    return result


def score_prompts(teacher, prompts: Sequence[Prompt], *, batch_tokens: int | None = None,
                  max_prompt_tokens: int | None = DEFAULT_MAX_PROMPT_TOKENS) -> list[float]:
    """Return the refusal score (float) of each prompt (a string or a chat message list), in order.

    ``teacher`` is a loaded ``Teacher``. Prompts are length-sorted into batches as in the filter.
    Raises whatever scoring raises (no fail-closed handling here: there are no rows to reject).
    """
    device = next(teacher.model.parameters()).device
    options = FilterOptions(batch_tokens=batch_tokens, max_prompt_tokens=max_prompt_tokens,
                            packed=False).resolved(device)
    rows = [Row(i + 1, i + 1, None, prompts=[p]) for i, p in enumerate(prompts)]
    window = _prepare_window(0, rows, teacher.tokenizer, options, pin=False)
    bad = [row for row in rows if row.reason is not None]
    if bad:
        raise UserError(f"prompt {bad[0].id - 1} cannot be scored: {bad[0].reason}")
    scores = [0.0] * len(rows)
    with torch.inference_mode():
        prefix = _prefix_cache(teacher.model, window, teacher.layer)
        for batch in window.batches:
            for unit, value in zip(batch.units, _score_batch(teacher.model, teacher.feature, teacher.layer, batch,
                                                             device, prefix)):
                scores[window.unit_rows[unit]] = value
    return scores


# --------------------------------------------------------------------------------------------
# Streaming
# --------------------------------------------------------------------------------------------


def _row_windows(source: Source, options: FilterOptions, start_window: int) -> Iterator[tuple[int, list[Row]]]:
    """Yield (window index, rows) for the windows of this shard from ``start_window`` on."""
    size = options.window_rows
    index, count = options.shard

    def wanted(ordinal: int) -> bool:
        window = ordinal // size
        return window >= start_window and window % count == index

    current, rows = None, []
    for raw in iter_raw_rows(source, wanted=wanted):
        window = raw.ordinal // size
        if window != current and rows:
            yield current, rows
            rows = []
        current = window
        rows.append(parse_row(raw, options.fields))
    if rows:
        yield current, rows


class _Prefetcher:
    """Runs ``_prepare_window`` on a background thread, ``_QUEUE_WINDOWS`` windows ahead."""

    _DONE = object()

    def __init__(self, source: Source, tokenizer, options: FilterOptions, start_window: int, pin: bool) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=_QUEUE_WINDOWS)
        self._stop = threading.Event()
        self._args = (source, tokenizer, options, start_window, pin)
        self._thread = threading.Thread(target=self._run, name="refteacher-filter-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        source, tokenizer, options, start_window, pin = self._args
        try:
            for index, rows in _row_windows(source, options, start_window):
                if not self._put(_prepare_window(index, rows, tokenizer, options, pin)):
                    return
            self._put(self._DONE)
        except BaseException as err:  # handed to the consumer, which re-raises it
            self._put(err)

    def __iter__(self) -> Iterator[_Window]:
        while True:
            item = self._queue.get()
            if item is self._DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        """Stop the background thread and wait for it."""
        self._stop.set()
        self._thread.join(timeout=10)


def iter_windows(teacher, source: Source, options: FilterOptions = FilterOptions(), *,
                 start_window: int = 0) -> Iterator[WindowResult]:
    """Yield a WindowResult per window of this shard (from ``start_window``), rows in input order.

    ``teacher`` is a loaded ``Teacher``; ``source`` from ``data.open_source``.
    """
    device = next(teacher.model.parameters()).device
    options = options.resolved(device)
    threshold = options.threshold if options.threshold is not None else teacher.threshold
    if not getattr(teacher.tokenizer, "chat_template", None):
        raise UserError(f"the teacher's tokenizer ({teacher.manifest.get('model')}) has no chat template; "
                        "prompts are scored as the chat model sees them, so use an instruction-tuned model")
    if options.packed and device.type == "cuda":
        _use_flash_attention(teacher.model)  # on CPU, packed batches use SDPA with a block mask (tests)
    prefetch = _Prefetcher(source, teacher.tokenizer, options, start_window, pin=device.type == "cuda")
    try:
        for window in prefetch:
            with torch.inference_mode():
                result = _score_window(teacher, window, threshold, device)
            yield result  # outside inference mode: the caller's code runs with its own grad mode
    finally:
        prefetch.close()


def iter_verdicts(teacher, source: Source | str | os.PathLike, options: FilterOptions = FilterOptions()
                  ) -> Iterator[Verdict]:
    """Yield a Verdict for every input row (of this shard), in input order: the embedding API.

    ``source`` is a Source or a path / ``hf:NAME`` (format from the file name).
    """
    if not isinstance(source, Source):
        source = open_source(source)
    for result in iter_windows(teacher, source, options):
        yield from result.verdicts


# --------------------------------------------------------------------------------------------
# The whole job: files, checkpoints, report
# --------------------------------------------------------------------------------------------


def shard_from_env(shard: str | None) -> tuple[int, int]:
    """Return (index, count) from ``I/N`` text, else torchrun's RANK / WORLD_SIZE, else (0, 1)."""
    if shard:
        try:
            index_text, count_text = shard.split("/")
            return int(index_text), int(count_text)
        except ValueError:
            raise UserError(f"--shard must look like I/N (e.g. 0/4), got {shard!r}") from None
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return 0, 1


def shard_dir(out_dir: str | os.PathLike, shard: tuple[int, int]) -> Path:
    """Return where a shard writes: ``out_dir`` itself for one shard, else ``out_dir/shard-I-of-N``."""
    index, count = shard
    return Path(out_dir) if count == 1 else Path(out_dir) / f"shard-{index}-of-{count}"


def run_settings(source: Source, teacher, options: FilterOptions) -> dict[str, Any]:
    """Return the settings a resumed run must share with the interrupted one (JSON-able)."""
    return {
        "input": source.fingerprint(),
        "format": source.fmt,
        "teacher_manifest_sha256": teacher.manifest_sha256,
        "threshold": options.threshold if options.threshold is not None else teacher.threshold,
        "batch_tokens": options.batch_tokens,
        "window_rows": options.window_rows,
        "max_prompt_tokens": options.max_prompt_tokens,
        "shard": list(options.shard),
        "prompt_field": options.fields.prompt,
        "messages_field": options.fields.messages,
        "packed": options.packed,
    }


def run_filter(teacher, source: Source, out_dir: str | os.PathLike, options: FilterOptions = FilterOptions(), *,
               resume: bool = False, overwrite: bool = False, progress: bool = True, plot: bool = True
               ) -> dict[str, Any]:
    """Filter ``source`` with ``teacher`` into ``out_dir``; return the report (also written as report.json).

    Writes kept.jsonl, flagged.jsonl, rejected.jsonl (input order), report.json, scores.png and
    checkpoint.json. ``resume`` continues an interrupted run; otherwise an ``out_dir`` that already
    holds results needs ``overwrite``. With shards, writes under ``out_dir/shard-I-of-N`` and, when
    the last shard finishes, merges them into ``out_dir``.
    """
    from refteacher.engine.checkpoint import CommittedFiles
    from refteacher.engine.filter_report import FilterTally, build_report, now_iso, plot_scores

    device = next(teacher.model.parameters()).device
    options = options.resolved(device)
    threshold = options.threshold if options.threshold is not None else teacher.threshold
    folder = shard_dir(out_dir, options.shard)
    if not resume and not overwrite and any((folder / name).exists() for name in (*OUTPUT_FILES, "checkpoint.json")):
        raise UserError(f"{folder} already holds filter results; pass --resume to continue that run or "
                        "--overwrite to start again")
    settings = run_settings(source, teacher, options)
    files = CommittedFiles(folder, OUTPUT_FILES, settings=settings, resume=resume)
    state = dict(files.state or {})
    already_finished = state.pop("finished", False)
    tally = FilterTally.from_json(state) if state else FilterTally(started=now_iso())
    tally.runs += 0 if already_finished else 1
    bar = _progress_bar(progress, source, options, tally)
    try:
        if not already_finished:
            clock = time.perf_counter()
            for result in iter_windows(teacher, source, options, start_window=tally.next_window):
                for verdict in result.verdicts:
                    files.append(verdict.status + ".jsonl", verdict.output_line())
                    tally.add_row(verdict.status, verdict.score, verdict.reason, verdict.truncated)
                tally.prompts += result.prompts
                tally.tokens += result.tokens
                tally.padded_tokens += result.padded_tokens
                tally.next_window = result.index + 1
                now = time.perf_counter()
                tally.seconds += now - clock
                clock = now
                files.commit(tally.to_json())
                bar.update(len(result.verdicts))
                if tally.scored():
                    bar.set_postfix(flagged=f"{tally.flagged / tally.scored():.1%}", rejected=tally.rejected)
            tally.finished = now_iso()
        state = tally.to_json()
        state["finished"] = True
        files.commit(state)
    finally:
        bar.close()
        files.close()
    teacher_info = {"path": str(teacher.path), "manifest_sha256": teacher.manifest_sha256,
                    "model": teacher.manifest.get("model"), "layer": teacher.layer,
                    "threshold": teacher.threshold}
    report = build_report(
        tally, threshold=threshold, threshold_source="override" if options.threshold is not None else "teacher",
        teacher=teacher_info, input_info={"location": source.location, "format": source.fmt},
        settings=settings, shard=f"{options.shard[0]}/{options.shard[1]}",
    )
    report["device"] = str(device)
    from refteacher.engine.checkpoint import write_json_atomic

    write_json_atomic(folder / "report.json", report)
    if plot:
        plot_scores(tally, threshold, folder / "scores.png")
    if options.shard[1] > 1:
        from refteacher.engine.merge import merge_when_complete

        merged = merge_when_complete(Path(out_dir), options.shard[1], plot=plot)
        if merged is not None:
            report["merged"] = str(Path(out_dir))
    return report


def _progress_bar(enabled: bool, source: Source, options: FilterOptions, tally):
    from tqdm import tqdm

    total = source.num_rows() if source.fmt == "parquet" else None
    if total is not None and options.shard[1] > 1:
        total = None  # a shard's share is not known up front
    return tqdm(total=total, initial=tally.rows, unit="rows", desc="filter", disable=not enabled,
                dynamic_ncols=True, smoothing=0.1)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def add_cli(subparsers) -> None:
    """Add the ``filter`` subcommand."""
    parser = subparsers.add_parser(
        "filter",
        help="split a finetuning dataset into kept / flagged / rejected rows with a teacher",
        description=(
            "Score every user prompt of a dataset with a teacher's refusal feature and split the rows: "
            "kept.jsonl (score < threshold), flagged.jsonl (score >= threshold), rejected.jsonl (rows that "
            "could not be read or scored, with the reason). Rows keep input order and gain _id (their line "
            "or row number) and _score. Also writes report.json and scores.png. Chat rows "
            "({'messages': [...]}) are scored per user turn; the row's score is the maximum."
        ),
    )
    parser.add_argument("--teacher", required=True, help="teacher directory (from `refteacher teacher`)")
    parser.add_argument("--input", required=True,
                        help="dataset: a .jsonl / .csv / .tsv / .parquet file (.gz for text), or hf:NAME")
    parser.add_argument("--out-dir", required=True, help="folder for the output files")
    parser.add_argument("--threshold", type=float, default=None,
                        help="flag rows scoring >= this (default: the teacher's calibrated threshold)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run in --out-dir")
    parser.add_argument("--overwrite", action="store_true", help="replace results already in --out-dir")
    parser.add_argument("--shard", default=None, metavar="I/N",
                        help="process shard I of N (default: torchrun's RANK/WORLD_SIZE, else all); output "
                             "goes to OUT/shard-I-of-N and the last shard to finish merges into OUT")
    parser.add_argument("--batch-tokens", type=int, default=None,
                        help="padded tokens per forward batch (default 8192 on CPU, 65536 on CUDA)")
    parser.add_argument("--window-rows", type=int, default=None,
                        help="rows read, sorted and committed together (default 1024 on CPU, 16384 on CUDA)")
    parser.add_argument("--max-prompt-tokens", type=int, default=DEFAULT_MAX_PROMPT_TOKENS,
                        help="longer prompts are scored on their last N tokens and marked _truncated "
                             f"(default {DEFAULT_MAX_PROMPT_TOKENS})")
    parser.add_argument("--format", choices=("jsonl", "csv", "parquet", "hf"), default=None,
                        help="input format (default: from the file name)")
    parser.add_argument("--prompt-field", default="prompt", help="field holding the prompt (default prompt)")
    parser.add_argument("--messages-field", default="messages",
                        help="field holding chat messages, used first when present (default messages)")
    parser.add_argument("--split", default="train", help="split of a Hugging Face dataset (default train)")
    parser.add_argument("--hf-config", default=None, help="configuration of a Hugging Face dataset")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice, one per core)")
    parser.add_argument("--no-packed", action="store_true", help="use padded batches even where flash-attn exists")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow the teacher model's own Python code (off by default)")
    parser.set_defaults(func=_cli_filter)


def _cli_filter(args) -> int:
    from refteacher.engine.teacher_dir import load_teacher

    shard = shard_from_env(args.shard)
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    device = args.device
    if device is None and shard[1] > 1 and "LOCAL_RANK" in os.environ and torch.cuda.is_available():
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    source = open_source(args.input, args.format, split=args.split, hf_config=args.hf_config)
    options = FilterOptions(
        threshold=args.threshold, batch_tokens=args.batch_tokens, window_rows=args.window_rows,
        max_prompt_tokens=args.max_prompt_tokens, shard=shard,
        fields=PromptFields(prompt=args.prompt_field, messages=args.messages_field),
        packed=False if args.no_packed else None,
    )
    teacher = load_teacher(args.teacher, device=device, trust_remote_code=args.trust_remote_code)
    report = run_filter(teacher, source, args.out_dir, options, resume=args.resume, overwrite=args.overwrite,
                        progress=not args.no_progress)
    counts = report["counts"]
    print(f"{counts['input_rows']} rows: {counts['kept']} kept, {counts['flagged']} flagged, "
          f"{counts['rejected']} rejected ({report['throughput']['rows_per_s']} rows/s) -> "
          f"{shard_dir(args.out_dir, shard)}")
    return 0
