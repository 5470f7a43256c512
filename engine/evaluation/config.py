"""What ``refteacher eval`` is asked to measure (``EvalConfig``): one option per field."""
from __future__ import annotations

from dataclasses import dataclass

from refteacher.engine.config_args import option


@dataclass
class EvalConfig:
    """An evaluation from the command line: the model, the held-out files, and generation settings."""

    model: str | None = option(None, "model directory, hub id or alias (default: the built-in model)")
    adapter: str | None = option(None, "LoRA adapter directory (e.g. OUT/adapter of `refteacher finetune`)")
    harmful: str | None = option(None, "held-out harmful prompts (JSONL/CSV/Parquet with a prompt field)")
    benign: str | None = option(None, "harmless prompts (same formats as --harmful): reports the fraction answered, "
                                      "so over-refusal shows beside the harmful score")
    task: str | None = option(None, "held-out task rows with prompt and answer fields")
    json_path: str | None = option(None, "write the report here as JSON", flag="--json")
    responses: str | None = option(None, "write every prompt, response and verdict here (JSONL)")
    limit: int | None = option(None, "evaluate only the first N rows of each file")
    max_new_tokens: int = option(64, "tokens generated per harmful prompt")
    task_max_new_tokens: int = option(48, "tokens generated per task prompt")
    batch_size: int = option(16, "prompts per generation batch")
    device: str | None = option(None, "cpu, cuda, ... (default: cuda if available)")
    filter_scores: str | None = option(
        None, "file of filter scores with labels (fields --score-field, --label-field) for filter metrics")
    score_field: str = option("score", "score field of --filter-scores rows")
    label_field: str = option("label", "label field (harmful/benign, 1/0) of --filter-scores rows")
    threshold: float | None = option(None, "filter threshold (default: the --teacher's)")
    teacher: str | None = option(None, "teacher directory whose threshold --filter-scores uses")
    progress: bool = option(True, "hide progress bars", flag="--no-progress")
