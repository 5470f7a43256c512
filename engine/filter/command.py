"""The ``refteacher filter`` and ``refteacher merge`` commands."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from refteacher.engine.config_args import add_config_arguments, config_from_args
from refteacher.engine.data.readers import open_source
from refteacher.engine.errors import UserError
from refteacher.engine.filter.config import FilterConfig
from refteacher.engine.filter.run import run_filter
from refteacher.engine.filter.shards import (
    _SHARD_NAME,
    find_shard_dirs,
    merge_shards,
    shard_dir,
    shard_from_env,
)
from refteacher.engine.modeling.teacher_dir import load_teacher


def add_filter_cli(subparsers) -> None:
    """Add the ``filter`` subcommand."""
    parser = subparsers.add_parser(
        "filter",
        help="split a finetuning dataset into kept / flagged / rejected rows with a teacher",
        description=(
            "Score every user prompt of a dataset with a teacher's refusal feature and split the rows: "
            "kept.jsonl (score < threshold), flagged.jsonl (score >= threshold), rejected.jsonl (rows that "
            "could not be read or scored, with the reason). Rows keep input order and gain _id (their line "
            "or row number) and _score. Also writes report.json and scores.png. Chat rows "
            "({'messages': [...]}) are scored per user turn; the row's score is the maximum. "
            "--engine ray spreads the run over a Ray cluster (JSONL or Parquet input; Parquet output too)."
        ),
    )
    add_config_arguments(parser, FilterConfig)
    parser.set_defaults(func=_cli_filter)


def _cli_filter(args) -> int:
    config = config_from_args(FilterConfig, args)
    if config.engine == "ray":
        return _cli_filter_ray(config)
    for name in ("ray_address", "workers", "output_format"):
        if getattr(config, name) is not None:
            raise UserError(f"--{name.replace('_', '-')} needs --engine ray")
    shard = shard_from_env(config.shard)
    if config.threads is not None:
        if config.threads < 1:
            raise UserError(f"--threads must be at least 1, got {config.threads}")
        torch.set_num_threads(config.threads)
    device = config.device
    if device is None and shard[1] > 1 and "LOCAL_RANK" in os.environ and torch.cuda.is_available():
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    source = open_source(config.input, config.format, split=config.split, hf_config=config.hf_config)
    teacher = load_teacher(config.teacher, device=device, trust_remote_code=config.trust_remote_code)
    report = run_filter(teacher, source, config.out_dir, config.options(shard), resume=config.resume,
                        overwrite=config.overwrite, progress=config.progress)
    print(_summary(report, "rows/s", shard_dir(config.out_dir, shard)))
    return 0


def _summary(report: dict, rate: str, where) -> str:
    """The one line a filter run prints: its counts, its rate and where the outputs are."""
    counts = report["counts"]
    return (f"{counts['input_rows']} rows: {counts['kept']} kept, {counts['flagged']} flagged, "
            f"{counts['rejected']} rejected ({report['throughput']['rows_per_s']} {rate}) -> {where}")


def _cli_filter_ray(config: FilterConfig) -> int:
    """``refteacher filter --engine ray``: the run spread over a Ray cluster (filter/ray_engine.py)."""
    if config.resume:
        raise UserError("--resume is for --engine single; Ray retries failed workers itself, so rerun a run whose "
                        "driver died with --overwrite")
    if config.shard is not None:
        raise UserError("--shard is for --engine single; --engine ray spreads one run over the cluster itself")
    from refteacher.engine.filter.ray_engine import run_filter_ray

    source = open_source(config.input, config.format, split=config.split, hf_config=config.hf_config)
    report = run_filter_ray(config.teacher, source, config.out_dir, config.options((0, 1)),
                            address=config.ray_address, workers=config.workers, device=config.device,
                            threads=config.threads, output_format=config.output_format, overwrite=config.overwrite,
                            progress=config.progress, trust_remote_code=config.trust_remote_code)
    print(_summary(report, f"rows/s on {report['engine']['workers']} Ray workers", config.out_dir))
    return 0


def add_merge_cli(subparsers) -> None:
    """Add the ``merge`` subcommand."""
    parser = subparsers.add_parser(
        "merge",
        help="join the outputs of `refteacher filter --shard I/N` runs",
        description=(
            "Merge finished shard outputs into the kept / flagged / rejected files, report.json and "
            "scores.png that a single unsharded run would have written (rows in input order)."
        ),
    )
    parser.add_argument("shards", nargs="+",
                        help="the --out-dir of the sharded runs (holding shard-I-of-N folders), or the shard "
                             "folders themselves")
    parser.add_argument("--out-dir", default=None,
                        help="where to write the merged files (default: the folder given, when it is one root)")
    parser.add_argument("--no-plot", action="store_true", help="skip scores.png")
    parser.set_defaults(func=_cli_merge)


def _cli_merge(args) -> int:
    if len(args.shards) == 1 and not _SHARD_NAME.match(Path(args.shards[0]).name):
        shard_dirs = find_shard_dirs(args.shards[0])
        out_dir = args.out_dir or args.shards[0]
    else:
        shard_dirs = [Path(s) for s in args.shards]
        if args.out_dir is None:
            raise UserError("pass --out-dir for the merged files when naming shard folders one by one")
        out_dir = args.out_dir
    report = merge_shards(shard_dirs, out_dir, plot=not args.no_plot)
    counts = report["counts"]
    print(f"merged {len(shard_dirs)} shards: {counts['input_rows']} rows, {counts['kept']} kept, "
          f"{counts['flagged']} flagged, {counts['rejected']} rejected -> {out_dir}")
    return 0
