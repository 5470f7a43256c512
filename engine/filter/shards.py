"""Joining the outputs of ``refteacher filter --shard I/N`` into the files one run would write.

Each shard writes kept / flagged / rejected.jsonl in input order with increasing ``_id``; the
merge is a k-way merge on ``_id`` that copies every line byte for byte, so the merged files equal
those of an unsharded run (shards hold whole windows, so their scores are computed identically).
Counts, histograms and times are summed into one report.json and scores.png. Every shard must be
finished and all of them must share the same settings.
"""
from __future__ import annotations

import heapq
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator, Sequence

from refteacher.engine.errors import UserError
from refteacher.engine.filter.checkpointed_output import read_checkpoint
from refteacher.engine.filter.report import FilterTally, build_report, plot_scores
from refteacher.engine.storage import atomic_write, write_json_atomic

OUTPUT_FILES = ("kept.jsonl", "flagged.jsonl", "rejected.jsonl")


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

_SHARD_NAME = re.compile(r"^shard-(\d+)-of-(\d+)$")
_LOCK = ".merge.lock"


def find_shard_dirs(root: str | os.PathLike) -> list[Path]:
    """Return the ``shard-I-of-N`` folders inside ``root``, sorted by I; UserError if none or mixed N."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root} is not a folder; pass the --out-dir of the sharded filter runs")
    found = {}
    for child in root.iterdir():
        match = _SHARD_NAME.match(child.name)
        if match and child.is_dir():
            found[(int(match.group(2)), int(match.group(1)))] = child
    counts = {count for count, _ in found}
    if not found:
        raise UserError(f"{root} holds no shard-I-of-N folders; pass the shard folders themselves or the "
                        "--out-dir the shards wrote to")
    if len(counts) > 1:
        raise UserError(f"{root} mixes shard counts {sorted(counts)}; remove the folders of the old run")
    return [found[key] for key in sorted(found)]


def _shard_states(shard_dirs: Sequence[Path]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Return (checkpoint, report) per shard; UserError unless all are finished, complete and alike."""
    loaded = []
    for folder in shard_dirs:
        checkpoint = read_checkpoint(folder)
        report_path = Path(folder) / "report.json"
        if checkpoint is None or not checkpoint["state"].get("finished") or not report_path.is_file():
            raise UserError(f"{folder} is not a finished filter run; finish it (`refteacher filter ... --resume`) "
                            "before merging")
        loaded.append((checkpoint, json.loads(report_path.read_text())))
    shards = [tuple(c["settings"]["shard"]) for c, _ in loaded]
    count = shards[0][1]
    if sorted(shards) != [(i, count) for i in range(count)]:
        have = ", ".join(f"{i}/{n}" for i, n in sorted(shards))
        raise UserError(f"need every shard 0..{count - 1} of {count} exactly once, got {have}")
    first = {k: v for k, v in loaded[0][0]["settings"].items() if k != "shard"}
    for (checkpoint, _), folder in zip(loaded, shard_dirs):
        mine = {k: v for k, v in checkpoint["settings"].items() if k != "shard"}
        if mine != first:
            raise UserError(f"{folder} was run with other settings than {shard_dirs[0]}; rerun it with the same "
                            "input, teacher and options")
    return loaded


def _lines_by_id(path: Path) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as f:
        for line in f:
            yield json.loads(line)["_id"], line


def merge_shards(shard_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike, *, plot: bool = True
                 ) -> dict[str, Any]:
    """Merge finished shard folders into ``out_dir`` (files replaced atomically); return the report."""
    shard_dirs = [Path(d) for d in shard_dirs]
    loaded = _shard_states(shard_dirs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUT_FILES:
        def write(tmp: Path, name: str = name) -> None:
            with open(tmp, "wb") as f:
                streams = [_lines_by_id(folder / name) for folder in shard_dirs]
                for _, line in heapq.merge(*streams, key=lambda item: item[0]):
                    f.write(line)

        atomic_write(out / name, write)
    tally = FilterTally.combine(
        FilterTally.from_json({k: v for k, v in c["state"].items() if k != "finished"}) for c, _ in loaded
    )
    first_report = loaded[0][1]
    settings = {k: v for k, v in loaded[0][0]["settings"].items() if k != "shard"}
    report = build_report(
        tally, threshold=first_report["threshold"], threshold_source=first_report["threshold_source"],
        teacher=first_report["teacher"], input_info=first_report["input"], settings=settings,
        shard=f"merged {len(shard_dirs)} shards",
    )
    report["shards"] = [str(d) for d in shard_dirs]
    write_json_atomic(out / "report.json", report)
    if plot:
        plot_scores(tally, report["threshold"], out / "scores.png")
    return report


def merge_when_complete(root: Path, count: int, *, plot: bool = True) -> dict[str, Any] | None:
    """Merge ``root/shard-*-of-count`` into ``root`` if every shard is finished; else return None.

    Called by each shard when it finishes, so the last one merges; a lock file keeps two shards that
    finish together from merging at once.
    """
    folders = [root / f"shard-{i}-of-{count}" for i in range(count)]
    for folder in folders:
        checkpoint = read_checkpoint(folder) if folder.is_dir() else None
        if checkpoint is None or not checkpoint["state"].get("finished") or not (folder / "report.json").is_file():
            return None
    lock = root / _LOCK
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return None
    os.close(fd)
    try:
        return merge_shards(folders, root, plot=plot)
    finally:
        lock.unlink(missing_ok=True)
