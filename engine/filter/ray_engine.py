"""The filter on a Ray cluster: Ray Data reads the input in parts, actors score it, the driver writes.

``TeacherBatchScorer`` is a callable class for ``Dataset.map_batches``: each actor loads the
teacher once and scores every batch it is handed with ``run.score_rows``, the code the
single-process filter runs per window (row parsing and validation, chat template, length-bucketed
batches, forward to the feature layer, cosine, verdict; a batch that fails is rejected with the
reason). It returns the batch's rows with ``_score``, ``_verdict`` (kept / flagged / rejected),
``_reason`` and ``_truncated``; providers can apply it to Ray Datasets of their own.

``run_filter_ray`` is ``refteacher filter --engine ray``. The input (one JSONL or Parquet file
that every node can read) is cut into splits that keep each row's id (``data/splits.py``) and read
by Ray Data; a pool of ``workers`` actors scores it (one GPU each on a GPU cluster, else
``threads`` CPUs each); the driver streams the results back in input order and writes kept /
flagged / rejected, as JSONL (byte for byte what the single-process filter writes, but for the
last digit of a score where batches differ) or as Parquet (the input's columns plus ``_id`` and
``_score`` / ``_truncated``, or ``_id``, ``_line`` and ``_reason``), and the same report.json and
scores.png.

Fault tolerance. An actor that dies (killed, out of memory, node lost) is restarted by Ray and its
batch retried (``max_restarts``, ``max_task_retries``). Only a finished batch reaches the driver,
and the driver checks that row ids strictly increase, so no row is lost or written twice. A batch
that kills its worker more than ``TASK_RETRIES`` times fails the run rather than dropping rows.
The output files are renamed into place only when the run has finished; there is no ``--resume``
(a run whose driver dies is started again).
"""
from __future__ import annotations

import dataclasses
import inspect
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from refteacher.engine.data.readers import Source, parse_row
from refteacher.engine.data.splits import (
    ID_COLUMN,
    SPLIT_FORMATS,
    Split,
    plan_splits,
    raw_rows,
    read_split,
    record_columns,
    row_bytes,
)
from refteacher.engine.errors import UserError
from refteacher.engine.filter.config import OUTPUT_FORMATS
from refteacher.engine.filter.report import FilterTally, build_report, now_iso, plot_scores
from refteacher.engine.filter.run import prepare_scoring, run_settings, score_rows
from refteacher.engine.filter.scoring import FilterOptions
from refteacher.engine.modeling.teacher_dir import load_teacher, read_manifest
from refteacher.engine.storage import write_json_atomic

try:
    import ray
    import ray.data
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask
except ImportError:
    raise UserError("the Ray engine needs Ray Data: pip install 'refteacher[ray]' (in a clone: "
                    "pip install -e '.[ray]'), or filter with --engine single") from None

TASK_RETRIES = 3  # a batch whose worker dies more often than this fails the run (fail closed)
ROWS_PER_BATCH = {"cpu": 256, "cuda": 4096}  # default rows per actor call (--window-rows): work for every actor
_MIN_BLOCK_BYTES = 4096
READ_TASKS_PER_WORKER = 4  # input splits per scoring actor (fewer for small files: data/splits.py)
STATUSES = ("kept", "flagged", "rejected")
# What the scorer adds to each row: column, Arrow type, and its value for a run.Verdict.
VERDICT_COLUMNS: tuple[tuple[str, pa.DataType, Callable[[Any], Any]], ...] = (
    ("_id", pa.int64(), lambda v: v.id),
    ("_line", pa.int64(), lambda v: v.line),
    ("_verdict", pa.string(), lambda v: v.status),
    ("_score", pa.float64(), lambda v: v.score),
    ("_truncated", pa.bool_(), lambda v: v.truncated),
    ("_reason", pa.string(), lambda v: v.reason),
    ("_category", pa.string(), lambda v: v.category),
)
ID_COLUMNS = ("_id", "_line")  # added only to rows read by data/splits.py (they carry the ids)
JSON_COLUMN = "_json"  # each row's output line (bytes), with json_lines=True
# With batch_stats: the batch's prompt, token and padded-token counts and when its scoring began
# (Unix time), on its first row (0 on the others).
STAT_COLUMNS = (("_prompts", pa.int64()), ("_tokens", pa.int64()), ("_padded_tokens", pa.int64()),
                ("_started_at", pa.float64()))
# Which verdict columns each Parquet output file keeps beside the input's own columns.
FILE_COLUMNS = {"kept": ("_id", "_score", "_truncated"), "flagged": ("_id", "_score", "_truncated", "_category"),
                "rejected": ("_id", "_line", "_reason")}


# --------------------------------------------------------------------------------------------
# Scoring: the map_batches callable
# --------------------------------------------------------------------------------------------


class TeacherBatchScorer:
    """Score batches of rows with a teacher: a callable class for ``Dataset.map_batches``.

    Built once per actor: loads ``teacher_dir`` on ``device`` (default: CUDA when the actor sees a
    GPU) with ``threads`` torch threads. Each call takes an Arrow table (or pandas DataFrame) of
    rows as ``refteacher filter`` reads them (a ``prompt`` or chat ``messages``; ``options.fields``)
    and returns the rows with ``_score``, ``_verdict``, ``_reason`` and ``_truncated`` (and ``_id``,
    ``_line`` for rows read by ``data/splits.py``). ``json_lines``: return only the verdict columns
    and ``_json``, each row's output line. ``batch_stats``: add the batch's counts and start time
    (``STAT_COLUMNS``).
    """

    def __init__(self, teacher_dir: str | os.PathLike, options: FilterOptions = FilterOptions(), *,
                 device: str | None = None, threads: int | None = None, trust_remote_code: bool = False,
                 json_lines: bool = False, batch_stats: bool = False) -> None:
        if threads is not None:
            torch.set_num_threads(threads)
        self.json_lines = json_lines
        self.batch_stats = batch_stats
        self.batches = 0
        self.error: UserError | None = None
        try:
            self.teacher = load_teacher(teacher_dir, device=device, trust_remote_code=trust_remote_code)
            self.options = prepare_scoring(self.teacher, options)
        except UserError as err:
            # Ray passes on a failed constructor as text only; raised from a call, the UserError
            # reaches the driver as itself (one line from the CLI, not a Ray traceback).
            self.error = err

    def __call__(self, batch: Any) -> pa.Table:
        """Score one batch; return its rows with the verdict columns (see the class doc)."""
        if self.error is not None:
            raise self.error
        started_at = time.time()
        table = batch if isinstance(batch, pa.Table) else pa.Table.from_pandas(batch, preserve_index=False)
        rows = [parse_row(raw, self.options.fields) for raw in raw_rows(table)]
        result = score_rows(self.teacher, rows, self.options, index=self.batches)
        self.batches += 1
        verdicts = result.verdicts
        has_ids = ID_COLUMN in table.column_names
        out = table.select([]) if self.json_lines else record_columns(table)
        for name, kind, value in VERDICT_COLUMNS:
            if name in ID_COLUMNS and not has_ids:
                continue
            out = _set_column(out, name, pa.array([value(v) for v in verdicts], kind))
        if self.json_lines:
            out = out.append_column(JSON_COLUMN, pa.array([v.output_line() for v in verdicts], pa.binary()))
        if self.batch_stats:
            values = (result.prompts, result.tokens, result.padded_tokens, started_at)
            for (name, kind), value in zip(STAT_COLUMNS, values):
                out = out.append_column(name, pa.array([value] + [0] * (len(verdicts) - 1), kind))
        return out


def _set_column(table: pa.Table, name: str, column: pa.Array) -> pa.Table:
    """``table`` with column ``name`` replaced by ``column`` (appended when absent)."""
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, column)
    return table.append_column(name, column)


# --------------------------------------------------------------------------------------------
# Reading: the input's splits as a Ray Datasource
# --------------------------------------------------------------------------------------------


class _SplitsDatasource(Datasource):
    """A JSONL or Parquet file as Ray read tasks, one per split (``data/splits.py``), planned here."""

    def __init__(self, source: Source, block_rows: int, parts: int) -> None:
        super().__init__()
        self.source = source
        self.block_rows = block_rows
        self.splits = plan_splits(source, parts)

    def get_name(self) -> str:
        return f"Refteacher{self.source.fmt.capitalize()}"

    def estimate_inmemory_data_size(self) -> int | None:
        return sum(split.size_bytes for split in self.splits)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, **_: Any) -> list[ReadTask]:
        """One task per split, whatever ``parallelism`` asks (the splits are planned already)."""
        source, block_rows = self.source, self.block_rows

        def task(split: Split) -> ReadTask:
            metadata = _block_metadata(num_rows=split.rows, size_bytes=split.size_bytes,
                                       input_files=[source.location], exec_stats=None)
            extra = {"per_task_row_limit": per_task_row_limit} if per_task_row_limit is not None else {}
            return ReadTask(lambda: read_split(source, split, block_rows), metadata, **extra)

        return [task(split) for split in self.splits]


def _block_metadata(**fields: Any) -> BlockMetadata:
    """BlockMetadata across Ray versions (older ones also take the schema)."""
    if "schema" in {f.name for f in dataclasses.fields(BlockMetadata)}:
        fields["schema"] = None
    return BlockMetadata(**fields)


def _read(source: Source, block_rows: int, parts: int) -> "ray.data.Dataset":
    """The input as a Ray Dataset read in about ``parts`` splits, ``block_rows`` rows at a time.

    Reads take no CPU of their own: they are light next to scoring, and must never wait for CPUs
    that the scoring actors hold.
    """
    datasource = _SplitsDatasource(source, block_rows, parts)
    blocks = len(datasource.splits)
    if "num_cpus" in inspect.signature(ray.data.read_datasource).parameters:
        return ray.data.read_datasource(datasource, num_cpus=0, override_num_blocks=blocks)
    return ray.data.read_datasource(datasource, ray_remote_args={"num_cpus": 0}, override_num_blocks=blocks)


# --------------------------------------------------------------------------------------------
# Writing: kept / flagged / rejected, in input order, renamed into place at the end
# --------------------------------------------------------------------------------------------


class _Outputs:
    """The three output files of a run, written under temporary names until ``close(finished=True)``."""

    def __init__(self, folder: Path, fmt: str, input_schema: pa.Schema | None) -> None:
        self.folder = folder
        self.fmt = fmt
        self.paths = {status: folder / f"{status}.{fmt}" for status in STATUSES}
        self.partial = {status: folder / f".{status}.{fmt}.partial" for status in STATUSES}
        if fmt == "jsonl":
            self.files = {status: open(self.partial[status], "wb") for status in STATUSES}
        else:
            self.schemas = {status: _file_schema(input_schema, status) for status in STATUSES}
            self.files = {status: pq.ParquetWriter(self.partial[status], self.schemas[status]) for status in STATUSES}

    def write(self, table: pa.Table, statuses: list[str]) -> None:
        """Append the rows of a scored batch to their files, in order."""
        if self.fmt == "jsonl":
            for status, line in zip(statuses, table.column(JSON_COLUMN).to_pylist()):
                self.files[status].write(line)
            return
        verdict = table.column("_verdict")
        for status in STATUSES:
            if status in statuses:
                rows = table.filter(pc.equal(verdict, status))
                self.files[status].write_table(rows.select(self.schemas[status].names).cast(self.schemas[status]))

    def close(self, finished: bool) -> None:
        """Close the files; rename them into place when ``finished``, else remove them."""
        for handle in self.files.values():
            handle.close()
        for status in STATUSES:
            if finished:
                os.replace(self.partial[status], self.paths[status])
            else:
                self.partial[status].unlink(missing_ok=True)


def _file_schema(input_schema: pa.Schema, status: str) -> pa.Schema:
    """The Parquet schema of one output file: the input's columns, then its verdict columns."""
    kinds = {name: kind for name, kind, _ in VERDICT_COLUMNS}
    added = FILE_COLUMNS[status]
    fields = [field for field in input_schema if field.name not in added]
    return pa.schema(fields + [pa.field(name, kinds[name]) for name in added])


def _existing_results(folder: Path) -> list[Path]:
    names = [f"{status}.{fmt}" for status in STATUSES for fmt in OUTPUT_FORMATS] + ["report.json", "checkpoint.json"]
    return [folder / name for name in names if (folder / name).exists()]


# --------------------------------------------------------------------------------------------
# The whole job
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RayPlan:
    """Where and how the scoring actors run (``plan_workers``)."""

    device: str  # "cpu" or "cuda"
    workers: int
    threads: int | None  # torch threads per actor (None: torch's default)
    cpus_per_worker: float
    gpus_per_worker: float


def plan_workers(resources: dict[str, float], *, device: str | None = None, workers: int | None = None,
                 threads: int | None = None) -> RayPlan:
    """Choose the actors for a cluster with ``resources`` (``ray.cluster_resources()``).

    Default: CUDA with one actor per GPU when the cluster has GPUs, else CPU actors of ``threads``
    torch threads (default 1) each, one per ``threads`` CPUs. UserError for impossible requests.
    """
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
    kind = (device or ("cuda" if gpus else "cpu")).split(":")[0]
    if kind not in ("cpu", "cuda"):
        raise UserError(f"--device must be cpu or cuda with --engine ray, got {device!r}")
    if workers is not None and workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be at least 1, got {threads}")
    if kind == "cuda":
        if not gpus:
            raise UserError("--device cuda, but the Ray cluster has no GPUs; pass --device cpu or join a GPU cluster")
        return RayPlan("cuda", workers or gpus, threads, 1.0, 1.0)
    threads = threads or 1
    return RayPlan("cpu", workers or max(1, cpus // threads), threads, float(threads), 0.0)


def _fault_tolerance() -> dict[str, Any]:
    """Actor options: restart a dead actor always, retry its batch ``TASK_RETRIES`` times.

    Ray Data's own defaults restart and retry without limit, so a batch that always kills its
    worker would never end; they are what remains on a Ray that no longer takes actor options in
    ``map_batches`` (announced for 2.64).
    """
    takes_options = any(p.kind is inspect.Parameter.VAR_KEYWORD
                        for p in inspect.signature(ray.data.Dataset.map_batches).parameters.values())
    return {"max_restarts": -1, "max_task_retries": TASK_RETRIES} if takes_options else {}


def _connect(address: str | None) -> bool:
    """Join the Ray cluster at ``address`` ($RAY_ADDRESS, else a new local one); True if this call started Ray."""
    if ray.is_initialized():
        return False
    try:
        ray.init(address=address, logging_level="WARNING")
    except ConnectionError as err:
        raise UserError(f"cannot reach the Ray cluster at {address or os.environ.get('RAY_ADDRESS')} ({err}); "
                        "check --ray-address (host:port of its GCS, or 'auto')") from None
    return True


def _user_error_in(err: BaseException) -> UserError | None:
    """The UserError behind a Ray error (Ray wraps what a task raised, maybe more than once), or None."""
    seen: set[int] = set()
    todo: list[BaseException] = [err]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, UserError) and not isinstance(current, ray.exceptions.RayError):
            return current
        todo += [e for e in (getattr(current, "cause", None), current.__cause__, current.__context__)
                 if isinstance(e, BaseException)]
    return None


def run_filter_ray(teacher_dir: str | os.PathLike, source: Source, out_dir: str | os.PathLike,
                   options: FilterOptions = FilterOptions(), *, address: str | None = None,
                   workers: int | None = None, device: str | None = None, threads: int | None = None,
                   output_format: str | None = None, overwrite: bool = False, progress: bool = True,
                   plot: bool = True, trust_remote_code: bool = False,
                   scorer: type = TeacherBatchScorer) -> dict[str, Any]:
    """Filter ``source`` on a Ray cluster into ``out_dir``; return the report (also report.json).

    ``teacher_dir`` must be readable by every node. ``address``: the cluster to join (default:
    the running one, $RAY_ADDRESS, else a local one started here and stopped at the end).
    ``workers``, ``device``, ``threads``: see ``plan_workers``. ``output_format``: ``jsonl`` or
    ``parquet`` (default: Parquet for Parquet input, else JSONL; Parquet output needs Parquet
    input). ``options.window_rows`` is the number of rows per batch handed to an actor.
    ``scorer``: the map_batches class (``TeacherBatchScorer`` or a subclass).
    """
    if source.fmt not in SPLIT_FORMATS:
        raise UserError(f"--engine ray reads JSONL or Parquet, not {source.fmt}; convert the input or use "
                        "--engine single")
    if options.shard != (0, 1):
        raise UserError("--shard splits a run across processes of --engine single; --engine ray spreads one "
                        "run over the cluster itself")
    output_format = output_format or ("parquet" if source.fmt == "parquet" else "jsonl")
    if output_format not in OUTPUT_FORMATS:
        raise UserError(f"output format must be jsonl or parquet, got {output_format!r}")
    if output_format == "parquet" and source.fmt != "parquet":
        raise UserError("Parquet output needs Parquet input (JSONL rows need not share one schema); "
                        "write JSONL output or convert the input")
    folder = Path(out_dir)
    existing = _existing_results(folder)
    if existing and not overwrite:
        raise UserError(f"{folder} already holds filter results; pass --overwrite to replace them")
    manifest = read_manifest(teacher_dir)  # fail early, on the driver, for a wrong folder

    started_ray = _connect(address)
    try:
        plan = plan_workers(ray.cluster_resources(), device=device, workers=workers, threads=threads)
        if options.window_rows is None:
            options = dataclasses.replace(options, window_rows=ROWS_PER_BATCH[plan.device])
        options = options.resolved(torch.device(plan.device))
        for path in existing:
            path.unlink()
        folder.mkdir(parents=True, exist_ok=True)
        scored = _scored_dataset(source, teacher_dir, options, plan, scorer, output_format=output_format,
                                 trust_remote_code=trust_remote_code)
        input_schema = pq.read_schema(source.location) if output_format == "parquet" else None
        tally, scoring_began = _write_outputs(scored, folder, output_format, input_schema, progress,
                                              source.num_rows())
    except ray.exceptions.RayError as err:
        user_error = _user_error_in(err)
        if user_error is not None:
            raise UserError(str(user_error)) from None
        raise
    finally:
        if started_ray:
            ray.shutdown()
    report = _report(tally, scoring_began, source, teacher_dir, manifest, options, plan, address=address,
                     output_format=output_format)
    write_json_atomic(folder / "report.json", report)
    if plot:
        plot_scores(tally, report["threshold"], folder / "scores.png")
    return report


def _report(tally: FilterTally, scoring_began: float, source: Source, teacher_dir: str | os.PathLike,
            teacher_manifest: tuple[dict[str, Any], str], options: FilterOptions, plan: RayPlan, *,
            address: str | None, output_format: str) -> dict[str, Any]:
    """report.json of a finished run: the single engine's report plus ``engine`` (workers, startup time).

    ``teacher_manifest``: what ``read_manifest(teacher_dir)`` returned; ``scoring_began``: seconds
    from the start of the run until the first actor began a batch.
    """
    manifest, manifest_sha256 = teacher_manifest
    teacher_info = {"path": str(teacher_dir), "manifest_sha256": manifest_sha256, "model": manifest.get("model"),
                    "layer": int(manifest["layer"]), "threshold": float(manifest["threshold"])}
    settings = run_settings(source, _ManifestOnly(manifest_sha256, teacher_info["threshold"]), options)
    settings.update(engine="ray", output_format=output_format)
    report = build_report(
        tally, threshold=options.threshold if options.threshold is not None else teacher_info["threshold"],
        threshold_source="override" if options.threshold is not None else "teacher",
        teacher=teacher_info, input_info={"location": source.location, "format": source.fmt},
        settings=settings, shard="0/1",
    )
    report["device"] = plan.device
    scoring = tally.seconds - scoring_began
    report["engine"] = {
        "name": "ray", "address": address, "workers": plan.workers, "threads_per_worker": plan.threads,
        "gpus_per_worker": plan.gpus_per_worker, "rows_per_batch": options.window_rows,
        # the fixed cost (actor processes started, teacher loaded) and the rate once scoring began
        "startup_s": round(scoring_began, 3),
        "rows_per_s_after_startup": round(tally.rows / scoring, 3) if scoring > 0 else None,
    }
    return report


def _scored_dataset(source: Source, teacher_dir: str | os.PathLike, options: FilterOptions, plan: RayPlan,
                    scorer: type, *, output_format: str, trust_remote_code: bool) -> "ray.data.Dataset":
    """The lazy pipeline: the input's splits, scored by a pool of ``plan.workers`` actors, in input order.

    Paths go to the workers absolute: their working folder need not be the driver's.
    """
    source = dataclasses.replace(source, location=str(Path(source.location).resolve()))
    with warnings.catch_warnings():  # the actor options of _fault_tolerance, deprecated in Ray 2.60
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        scored = _read(source, options.window_rows, parts=READ_TASKS_PER_WORKER * plan.workers).map_batches(
            scorer,
            fn_constructor_args=(str(Path(teacher_dir).resolve()), options),
            fn_constructor_kwargs={"device": plan.device, "threads": plan.threads,
                                   "trust_remote_code": trust_remote_code,
                                   "json_lines": output_format == "jsonl", "batch_stats": True},
            batch_format="pyarrow", batch_size=options.window_rows, zero_copy_batch=True,
            compute=ray.data.ActorPoolStrategy(size=plan.workers),
            num_cpus=plan.cpus_per_worker, num_gpus=plan.gpus_per_worker,
            **_fault_tolerance(),
        )
    # Ray Data sizes blocks in bytes (merging what a read task yields up to the target) and hands an
    # actor a whole block per call: blocks of about one batch of rows give every actor work.
    scored.context.target_max_block_size = max(_MIN_BLOCK_BYTES, int(options.window_rows * row_bytes(source)))
    scored.context.execution_options.preserve_order = True  # outputs in input order, as the single engine
    scored.context.enable_progress_bars = False  # the driver's own bar counts rows
    scored.context.raise_original_map_exception = True  # a UserError of an actor reaches the driver as itself
    return scored


@dataclasses.dataclass(frozen=True)
class _ManifestOnly:
    """What ``run.run_settings`` reads of a teacher, from its manifest (the driver loads no model)."""

    manifest_sha256: str
    threshold: float


def _write_outputs(scored: "ray.data.Dataset", folder: Path, fmt: str, input_schema: pa.Schema | None,
                   progress: bool, source_rows: int | None) -> tuple[FilterTally, float]:
    """Stream the scored rows (in input order) into the output files.

    Returns the run's tally and the seconds until the first actor began a batch (startup).
    """
    tally = FilterTally(started=now_iso(), runs=1)
    outputs = _Outputs(folder, fmt, input_schema)
    finished = False
    last_id = 0
    bar = tqdm(total=source_rows, unit="rows", desc="filter (ray)", disable=not progress, dynamic_ncols=True,
               smoothing=0.1)
    clock, began = time.perf_counter(), time.time()
    first_start = float("inf")
    try:
        for table in scored.iter_batches(batch_size=None, batch_format="pyarrow"):
            started = pc.min(pc.filter(table.column("_started_at"), pc.greater(table.column("_started_at"), 0)))
            first_start = min(first_start, started.as_py() or first_start)  # blocks may hold several batches
            ids = table.column("_id").to_pylist()
            if ids and (ids[0] <= last_id or any(b <= a for a, b in zip(ids, ids[1:]))):
                raise RuntimeError(f"row ids arrived out of order or twice near id {ids[0]}; outputs not written")
            last_id = ids[-1] if ids else last_id
            statuses = table.column("_verdict").to_pylist()
            for status, score, reason, truncated, category in zip(
                    statuses, table.column("_score").to_pylist(), table.column("_reason").to_pylist(),
                    table.column("_truncated").to_pylist(), table.column("_category").to_pylist()):
                tally.add_row(status, score, reason, truncated, category)
            tally.prompts += pc.sum(table.column("_prompts")).as_py() or 0
            tally.tokens += pc.sum(table.column("_tokens")).as_py() or 0
            tally.padded_tokens += pc.sum(table.column("_padded_tokens")).as_py() or 0
            outputs.write(table, statuses)
            bar.update(len(ids))
        tally.seconds = time.perf_counter() - clock
        tally.finished = now_iso()
        finished = True
    finally:
        bar.close()
        outputs.close(finished)
    return tally, max(0.0, min(first_start - began, tally.seconds))
