"""What ``refteacher filter`` is asked to do (``FilterConfig``): one option per field."""
from __future__ import annotations

from dataclasses import dataclass

from refteacher.engine.config_args import option
from refteacher.engine.data.readers import FORMATS, PromptFields
from refteacher.engine.filter.scoring import DEFAULT_MAX_PROMPT_TOKENS, FilterOptions

ENGINES = ("single", "ray")
OUTPUT_FORMATS = ("jsonl", "parquet")


@dataclass
class FilterConfig:
    """A filter run from the command line: where the data and the teacher are, how to score."""

    teacher: str = option(help="teacher directory (from `refteacher teacher`)")
    input: str = option(help="dataset: a .jsonl / .csv / .tsv / .parquet file (.gz for text), or hf:NAME")
    out_dir: str = option(help="folder for the output files")
    threshold: float | None = option(None, "flag rows scoring >= this (default: the teacher's calibrated threshold)")
    resume: bool = option(False, "continue an interrupted run in --out-dir")
    overwrite: bool = option(False, "replace results already in --out-dir")
    shard: str | None = option(None, "process shard I of N (default: torchrun's RANK/WORLD_SIZE, else all); output "
                                     "goes to OUT/shard-I-of-N and the last shard to finish merges into OUT",
                               metavar="I/N")
    batch_tokens: int | None = option(None, "padded tokens per forward batch (default 8192 on CPU, 65536 on CUDA)")
    window_rows: int | None = option(None, "rows read, sorted and committed together (default 1024 on CPU, 16384 on "
                                           "CUDA; with --engine ray: rows per batch of a worker, 256 on CPU, 4096 "
                                           "on CUDA)")
    max_prompt_tokens: int = option(DEFAULT_MAX_PROMPT_TOKENS,
                                    "longer prompts are scored on their last N tokens and marked _truncated")
    format: str | None = option(None, "input format (default: from the file name)", choices=FORMATS)
    prompt_field: str = option("prompt", "field holding the prompt")
    messages_field: str = option("messages", "field holding chat messages, used first when present")
    split: str = option("train", "split of a Hugging Face dataset")
    hf_config: str | None = option(None, "configuration of a Hugging Face dataset")
    device: str | None = option(None, "cpu, cuda or cuda:N (default: cuda if available; with --engine ray: cuda if "
                                      "the cluster has GPUs)")
    threads: int | None = option(None, "CPU threads for torch (default: torch's choice, one per core; with --engine "
                                       "ray: per CPU worker, default 1)")
    engine: str = option("single", "single: this process (torchrun: one per --shard); ray: Ray Data actors on a Ray "
                                   "cluster (pip install 'refteacher[ray]')", choices=ENGINES)
    ray_address: str | None = option(None, "Ray cluster to join (default: $RAY_ADDRESS, else a local one); "
                                           "--engine ray", metavar="ADDR")
    workers: int | None = option(None, "scoring actors (default: one per GPU of the cluster, else one per --threads "
                                       "CPUs); --engine ray")
    output_format: str | None = option(None, "kept/flagged/rejected as jsonl or parquet (default: parquet for Parquet "
                                             "input, else jsonl); --engine ray", choices=OUTPUT_FORMATS)
    packed: bool = option(True, "use padded batches even where flash-attn exists", flag="--no-packed")
    progress: bool = option(True, "hide the progress bar", flag="--no-progress")
    trust_remote_code: bool = option(False, "allow the teacher model's own Python code (off by default)")

    def options(self, shard: tuple[int, int]) -> FilterOptions:
        """The scoring options of this run, for shard ``(index, count)``."""
        return FilterOptions(
            threshold=self.threshold, batch_tokens=self.batch_tokens, window_rows=self.window_rows,
            max_prompt_tokens=self.max_prompt_tokens, shard=shard,
            fields=PromptFields(prompt=self.prompt_field, messages=self.messages_field),
            packed=None if self.packed else False,
        )
