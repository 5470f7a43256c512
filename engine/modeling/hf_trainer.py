"""What the teacher's and the finetune's transformers ``Trainer`` runs share.

Both train LoRA adapters with a custom ``compute_loss`` on ``Trainer``, so checkpoints
(``checkpoint-N`` folders), resuming, logging, gradient accumulation and torchrun / accelerate
launches behave the same for both. This module holds the settings they have in common and the
look-up of the checkpoint to resume from.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import PrinterCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint


def latest_checkpoint(folder: str | Path) -> str | None:
    """The newest ``checkpoint-N`` folder under ``folder``, or None (also when ``folder`` is absent)."""
    folder = Path(folder)
    return get_last_checkpoint(str(folder)) if folder.is_dir() else None


def training_arguments(output_dir: str | Path, device: torch.device, *, progress: bool,
                       **settings: Any) -> TrainingArguments:
    """TrainingArguments with the settings every refteacher run shares, plus ``settings``.

    Shared: step-based checkpoints under ``output_dir`` (the last two kept), no reporting
    integrations, batches made in the main process from datasets that are not Hugging Face
    tables (no column removal), the CPU when ``device`` is one, a progress bar when ``progress``.
    ``settings`` override any of these.
    """
    shared: dict[str, Any] = {
        "output_dir": str(output_dir),
        "save_strategy": "steps",
        "save_total_limit": 2,
        "report_to": "none",
        "remove_unused_columns": False,
        "dataloader_num_workers": 0,
        "use_cpu": device.type == "cpu",
        "disable_tqdm": not progress,
    }
    return TrainingArguments(**(shared | settings))


def silence_log_printing(trainer) -> None:
    """Stop ``trainer`` printing its logs to stdout; it adds a printer when its progress bar is off.

    Logs still go to ``trainer.state.log_history`` and to any other callbacks.
    """
    trainer.remove_callback(PrinterCallback)
