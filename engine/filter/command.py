"""The ``refteacher filter`` and ``refteacher merge`` commands."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from refteacher.engine.data.readers import PromptFields, open_source
from refteacher.engine.errors import UserError
from refteacher.engine.filter.run import run_filter
from refteacher.engine.filter.scoring import DEFAULT_MAX_PROMPT_TOKENS, FilterOptions
from refteacher.engine.filter.shards import (
    _SHARD_NAME,
    find_shard_dirs,
    merge_shards,
    shard_dir,
    shard_from_env,
)
from refteacher.engine.modeling.teacher_dir import load_teacher

# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


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
