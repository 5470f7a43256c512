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
checkpointing and report). The ``filter`` command is in filter/command.py.
"""
from __future__ import annotations

import json
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from tqdm import tqdm

from refteacher.engine.data.readers import Row, Source, iter_raw_rows, open_source, parse_row
from refteacher.engine.errors import UserError
from refteacher.engine.filter.checkpointed_output import CommittedFiles
from refteacher.engine.filter.report import FilterTally, build_report, now_iso, plot_scores
from refteacher.engine.filter.scoring import (
    FilterOptions,
    _prefix_cache,
    _prepare_window,
    _score_batch,
    _use_flash_attention,
    _Window,
)
from refteacher.engine.filter.shards import OUTPUT_FILES, shard_dir
from refteacher.engine.modeling.prompt_states import PrefixCache
from refteacher.engine.storage import write_json_atomic

_QUEUE_WINDOWS = 2  # prepared windows waiting ahead of the forward pass


@dataclass
class Verdict:
    """The outcome for one input row.

    ``status`` is ``kept``, ``flagged`` or ``rejected``; ``score`` the row's score (None when
    rejected); ``reason`` why it was rejected; ``record`` the row as read (None if unreadable, then
    ``raw`` holds its text); ``tokens`` the prompt tokens scored; ``category`` for a flagged row of a
    teacher with category directions, the hazard category nearest its flagged prompt.
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
    category: str | None = None

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
        if self.category is not None:
            out["_category"] = self.category
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


def _nearest_category(categories: Sequence[str], cosines: Sequence[float]) -> str | None:
    """The category whose direction is nearest (highest cosine); None for a teacher without any."""
    if not categories:
        return None
    return categories[max(range(len(categories)), key=lambda k: cosines[k])]


def _score_window(teacher, window: _Window, threshold: float, device: torch.device) -> WindowResult:
    """Score every batch of a prepared window and return the rows' verdicts in input order."""
    unit_scores: list[list[float] | None] = [None] * len(window.unit_rows)
    row_failure: dict[int, str] = {}
    result = WindowResult(window.index, [])
    features = teacher.score_features()  # [1 + K, H]: the verdict's feature, then the categories'
    prefix: PrefixCache | Exception | None
    try:
        prefix = _prefix_cache(teacher.model, window, teacher.layer)
    except Exception as err:  # every batch of the window needs it: each fails with this error
        prefix = err
    for batch in window.batches:
        try:
            if isinstance(prefix, Exception):
                raise prefix
            values = _score_batch(teacher.model, features, teacher.layer, batch, device, prefix)
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
    row_best: dict[int, list[float]] = {}  # the scores of the row's highest-scoring prompt
    row_truncated: dict[int, bool] = {}
    for unit, pos in enumerate(window.unit_rows):
        values = unit_scores[unit]
        if values is not None and (pos not in row_best or values[0] > row_best[pos][0]):
            row_best[pos] = values
        row_truncated[pos] = row_truncated.get(pos, False) or window.unit_truncated[unit]
    for pos, row in enumerate(window.rows):
        reason = row.reason or row_failure.get(pos)
        if reason is not None:
            verdict = Verdict(row.id, row.line, "rejected", reason=reason, record=row.record, raw=row.raw)
        else:
            best = row_best[pos]
            score = round(best[0], 6)
            status = "flagged" if score >= threshold else "kept"
            category = _nearest_category(teacher.categories, best[1:]) if status == "flagged" else None
            verdict = Verdict(row.id, row.line, status, score=score, truncated=row_truncated.get(pos, False),
                              record=row.record, category=category)
        result.verdicts.append(verdict)
    return result


def prepare_scoring(teacher, options: FilterOptions) -> FilterOptions:
    """Check that ``teacher`` can score and return ``options`` resolved for its device.

    UserError when its tokenizer has no chat template. Switches the model to flash-attn for packed
    batches on CUDA. Every engine calls this once per loaded teacher, before ``score_rows``.
    """
    device = next(teacher.model.parameters()).device
    options = options.resolved(device)
    if not getattr(teacher.tokenizer, "chat_template", None):
        raise UserError(f"the teacher's tokenizer ({teacher.manifest.get('model')}) has no chat template; "
                        "prompts are scored as the chat model sees them, so use an instruction-tuned model")
    if options.packed and device.type == "cuda":
        _use_flash_attention(teacher.model)  # on CPU, packed batches use SDPA with a block mask (tests)
    return options


def score_rows(teacher, rows: list[Row], options: FilterOptions, *, index: int = 0) -> WindowResult:
    """Score one window of parsed rows and return their verdicts, in input order.

    What ``iter_windows`` does per window (tokenise, length-bucketed batches, forward to the
    feature layer, cosine, verdicts; failures rejected), in one call on the calling thread: the
    unit of work of engines that bring their own parallelism (the Ray engine). ``options`` come
    from ``prepare_scoring``; ``index`` only labels the result.
    """
    device = next(teacher.model.parameters()).device
    threshold = options.threshold if options.threshold is not None else teacher.threshold
    window = _prepare_window(index, rows, teacher.tokenizer, options, pin=device.type == "cuda")
    with torch.inference_mode():
        return _score_window(teacher, window, threshold, device)


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
    options = prepare_scoring(teacher, options)
    threshold = options.threshold if options.threshold is not None else teacher.threshold
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
                    tally.add_row(verdict.status, verdict.score, verdict.reason, verdict.truncated, verdict.category)
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

    write_json_atomic(folder / "report.json", report)
    if plot:
        plot_scores(tally, threshold, folder / "scores.png")
    if options.shard[1] > 1:
        from refteacher.engine.filter.shards import merge_when_complete

        merged = merge_when_complete(Path(out_dir), options.shard[1], plot=plot)
        if merged is not None:
            report["merged"] = str(Path(out_dir))
    return report


def _progress_bar(enabled: bool, source: Source, options: FilterOptions, tally):
    total = source.num_rows() if source.fmt == "parquet" else None
    if total is not None and options.shard[1] > 1:
        total = None  # a shard's share is not known up front
    return tqdm(total=total, initial=tally.rows, unit="rows", desc="filter", disable=not enabled,
                dynamic_ncols=True, smoothing=0.1)
