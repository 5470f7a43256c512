"""What the teacher's and the finetune's transformers ``Trainer`` runs share.

Both train LoRA adapters with a custom ``compute_loss`` on ``Trainer``, so checkpoints
(``checkpoint-N`` folders), resuming, logging, gradient accumulation and torchrun / accelerate
launches behave the same for both. This module holds the settings they have in common, the
look-up of the checkpoint to resume from, and ``RankSyncedSteps``, the gradient all-reduce of
steps whose forward passes run the model inside the DDP wrapper directly.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import PrinterCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from refteacher.engine.errors import UserError
from refteacher.engine.modeling.distributed import average_gradients, is_ddp, unwrap_model


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


class RankSyncedSteps:
    """A mixin for ``Trainer`` subclasses whose ``compute_loss`` runs ``unwrap_model(model)``.

    DDP all-reduces only the gradients of forward passes it ran itself, and both losses go around
    it: the teacher's stops at the feature layer and reuses a prefix cache, the finetune's runs the
    student on task and alignment rows in two passes and multiplies the LM head itself. So after
    the backward of each step's last micro-batch (Trainer's ``sync_gradients``), the trainable
    gradients are averaged over the ranks here, in one all-reduce, before clipping and the
    optimizer step: the update a 1-process run of the same global batch makes. Without DDP (one
    process, or DeepSpeed, whose engine reduces gradients in its own backward) nothing changes.
    """

    def training_step(self, model, inputs, num_items_in_batch=None):
        if not getattr(self, "_parallelism_checked", False):
            check_parallelism(self.accelerator)
            self._parallelism_checked = True
        loss = super().training_step(model, inputs, num_items_in_batch)
        if is_ddp(model) and self.accelerator.sync_gradients:
            average_gradients(unwrap_model(model).parameters())
        return loss


def check_parallelism(accelerator) -> None:
    """Raise UserError for a launch that shards the weights (FSDP, DeepSpeed ZeRO-3).

    Both losses read weights outside the wrapped forward (the LM head, the layers up to the
    feature layer), which under those schemes hold only this rank's shard. Data parallelism (DDP
    through torchrun or ``accelerate launch --multi_gpu``, DeepSpeed ZeRO-1/2) keeps every weight
    whole on every rank.
    """
    kind = str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type))
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    stage = getattr(plugin, "zero_stage", 0) if kind == "DEEPSPEED" else 0
    if kind == "FSDP" or (stage or 0) >= 3:
        scheme = "FSDP" if kind == "FSDP" else "DeepSpeed ZeRO-3"
        raise UserError(f"{scheme} shards the model's weights, which refteacher's fused losses read whole; "
                        "launch data-parallel instead (torchrun, `accelerate launch --multi_gpu`, or DeepSpeed "
                        "ZeRO stage 1 or 2)")
