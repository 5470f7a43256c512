"""Teacher-guided finetuning (``refteacher finetune``): LoRA on packed user data + KL to the teacher.

One optimisation step of the student (the base model with a fresh peft LoRA adapter):

    loss = CE(student, packed rows of the kept user data)            (labels on responses only)
         + lambda * KL(teacher || student) on alignment data           (refusals to harmful prompts)

Both terms are computed from final hidden states (after the final norm) and LM-head weights, never
from full logits: the cross-entropy over the label positions only, a chunk at a time
(``refteacher.engine.losses``), the KL with ``refteacher.kernels.kl.fused_linear_kl`` over the
response tokens of the alignment rows. The teacher is frozen: when it was built on the student's
own model it is that model with the teacher's adapter switched in (``SharedBaseTeacher``: no
second copy of the weights), otherwise a separately loaded model with its adapter merged.

Training runs on transformers' ``Trainer`` with a custom ``compute_loss`` and data collator (the
settings shared with the teacher's Trainer in engine/modeling/hf_trainer.py), so
checkpoints (``OUT/checkpoints/checkpoint-N``), gradient accumulation, logging, ``--resume`` and
accelerate / torchrun launches behave as users expect (each rank computes both losses on its
own micro-batches, the gradients are averaged, and rank 0 writes the outputs). The data is
streamed: rows are read and tokenised in batches and packed as they come
(``engine/finetune/dataset.py``) into memory-mapped stores under ``OUT/packed``, so memory does not
grow with the dataset. Every dataset item is one packed task row paired with one packed
alignment row (alignment rows are cycled); the sampler shuffles items with the run's seed, and a
resumed run skips exactly the batches already seen (and reuses the stores instead of tokenising
again).

``baseline="sft"`` is plain LoRA finetuning on the (unfiltered) data with no teacher and no KL.

Outputs under ``OUT``: ``adapter/`` (the student's LoRA adapter, loadable with
``PeftModel.from_pretrained``), ``finetune.json`` (configuration, inputs, figures) and
``checkpoints/``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from transformers import Trainer, set_seed

from refteacher.engine.data.readers import open_source
from refteacher.engine.errors import UserError
from refteacher.engine.finetune.alignment import builtin_alignment_rows
from refteacher.engine.finetune.config import (
    ADAPTER_DIR,
    BUILTIN_ALIGN_FILE,
    CHECKPOINT_DIR,
    FORMAT,
    PACKED_DIR,
    SUMMARY_FILE,
    FinetuneConfig,
)
from refteacher.engine.finetune.dataset import PackedPairCollator, PairedRows, build_packed_rows
from refteacher.engine.finetune.losses import alignment_kl, task_cross_entropy
from refteacher.engine.finetune.shared_teacher import SharedBaseTeacher
from refteacher.engine.modeling.attention import prepare_for_packing
from refteacher.engine.modeling.distributed import (
    barrier,
    gather_objects,
    is_main_process,
    launch_device,
    mean_across_ranks,
    parameter_digest,
    unwrap_model,
    world_size,
)
from refteacher.engine.modeling.forward import lm_head_of
from refteacher.engine.modeling.hf_trainer import RankSyncedSteps, latest_checkpoint, training_arguments
from refteacher.engine.modeling.loading import (
    DEFAULT_MODEL,
    load_model,
    load_tokenizer,
    model_fingerprint,
)
from refteacher.engine.modeling.teacher_dir import load_teacher, read_manifest
from refteacher.engine.storage import write_jsonl

log = logging.getLogger(__name__)


def _make_trainer_class():
    """Build the Trainer subclass lazily (transformers is imported only when training)."""
    class DistillTrainer(RankSyncedSteps, Trainer):
        """transformers' Trainer with the ReFT loss: CE on packed task rows + lambda * KL on alignment rows.

        The loss runs the student unwrapped (``RankSyncedSteps`` averages its gradients over the
        ranks of a DDP run); the logged ``ce`` and ``kl`` are means over micro-batches and ranks.
        """

        def __init__(self, *args, teacher=None, lam: float = 0.0, temperature: float = 1.0,
                     direction: str = "forward", beta: float = 0.5, chunk_size: int | None = None, **kwargs):
            super().__init__(*args, **kwargs)
            self.teacher = teacher
            self.lam = float(lam)
            self.temperature = float(temperature)
            self.direction = direction
            self.beta = float(beta)
            self.chunk_size = chunk_size
            # compute_loss returns a per-micro-batch mean: let Trainer divide by the accumulation steps.
            self.model_accepts_loss_kwargs = False
            self._parts: dict[str, list[float]] = {"ce": [], "kl": []}

        @property
        def distilling(self) -> bool:
            return self.teacher is not None and self.lam > 0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            model = unwrap_model(model)
            ce = task_cross_entropy(model, inputs, chunk_size=self.chunk_size)
            loss = ce
            self._parts["ce"].append(float(ce.detach()))
            if self.distilling and "align_input_ids" in inputs:
                kl = alignment_kl(model, self.teacher, inputs, temperature=self.temperature,
                                  direction=self.direction, beta=self.beta, chunk_size=self.chunk_size)
                loss = ce + self.lam * kl
                self._parts["kl"].append(float(kl.detach()))
            return (loss, {"loss": loss}) if return_outputs else loss

        def log(self, logs: dict[str, float], *args, **kwargs) -> None:
            if "loss" in logs:
                # Every rank logs at the same steps with the same keys: the mean is a collective.
                names = ["ce", "kl"] if self.distilling else ["ce"]
                local = {n: sum(v) / len(v) if v else 0.0 for n, v in self._parts.items() if n in names}
                logs.update({n: round(v, 6) for n, v in mean_across_ranks(local).items()})
                for values in self._parts.values():
                    values.clear()
            super().log(logs, *args, **kwargs)

    return DistillTrainer


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def _file_sha256(path: str | os.PathLike) -> str | None:
    p = Path(path)
    if not p.is_file():
        return None
    digest = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_same_vocabulary(student_tokenizer, teacher_tokenizer, student_model, teacher_model) -> None:
    """Raise UserError unless student and teacher share a vocabulary (ids mean the same tokens)."""
    vs, vt = lm_head_of(student_model)[0].shape[0], lm_head_of(teacher_model)[0].shape[0]
    probe = "Hello! How do I bake bread? <|im_start|>user 12345"
    if vs != vt or student_tokenizer(probe)["input_ids"] != teacher_tokenizer(probe)["input_ids"]:
        raise UserError(f"student and teacher use different vocabularies ({vs} vs {vt} logits); "
                        "distillation needs a teacher built on the same tokenizer as the student")


def add_lora(model, config: FinetuneConfig):
    """Wrap ``model`` with a fresh trainable LoRA adapter (peft); return the PeftModel."""
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha if config.lora_alpha is not None else 2 * config.lora_r,
        lora_dropout=config.lora_dropout,
        target_modules=config.lora_targets if config.lora_targets == "all-linear" else config.lora_targets.split(","),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def _resolve_student(config: FinetuneConfig, teacher_manifest: dict[str, Any] | None) -> str:
    if config.student:
        return config.student
    if teacher_manifest is not None:
        return str(teacher_manifest["model"])
    return DEFAULT_MODEL


def _write_builtin_alignment(model, tokenizer, config: FinetuneConfig, student_spec: str, out: Path) -> Path:
    """Write the built-in alignment rows (engine/finetune/alignment.py) to OUT/align.jsonl; return the path."""
    rows = builtin_alignment_rows(model, tokenizer, model_hash=model_fingerprint(student_spec), rows=config.align_rows,
                                  helpful_fraction=config.align_helpful, seed=config.seed, progress=config.progress)
    path = out / BUILTIN_ALIGN_FILE
    if is_main_process():
        write_jsonl(path, rows)
    return path


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def run_finetune(config: FinetuneConfig, *, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Finetune the student as ``config`` says; write OUT/adapter and OUT/finetune.json; return the summary.

    ``callbacks`` are extra transformers ``TrainerCallback``s. Raises UserError for bad settings
    or inputs, and for ``resume`` without a checkpoint.
    """
    config.check()
    out = Path(config.out)
    checkpoints = out / CHECKPOINT_DIR
    resume_from = None
    if config.resume:
        resume_from = latest_checkpoint(checkpoints)
        if resume_from is None:
            raise UserError(f"--resume: no checkpoint under {checkpoints}; run without --resume to start")
    elif latest_checkpoint(checkpoints) is not None:
        raise UserError(f"{checkpoints} already holds checkpoints; pass --resume to continue that run "
                        "or choose another --out")
    device = launch_device(config.device)
    set_seed(config.seed)

    teacher = None
    teacher_manifest = None
    teacher_sha = None
    if config.teacher and config.baseline is None:
        teacher_manifest, teacher_sha = read_manifest(config.teacher)
    student_spec = _resolve_student(config, teacher_manifest)
    # The data is tokenised and packed before any model loads, so a bad file fails in seconds, not
    # after a load; the packed rows go to OUT/packed (streamed: memory does not grow with the data).
    open_source(config.data)
    if config.distilling and config.align:
        open_source(config.align)
    args = training_arguments(
        checkpoints, device, progress=config.progress,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.rows_per_step,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.learning_rate,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        logging_steps=config.logging_steps,
        save_steps=config.save_steps,
        seed=config.seed,
        data_seed=config.seed,
        bf16=device.type == "cuda",
        **({"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}}
           if config.gradient_checkpointing else {}),
    )
    tokenizer = load_tokenizer(student_spec)
    with args.main_process_first(local=True, desc="tokenising and packing the training rows"):
        task_rows = build_packed_rows(tokenizer, config.data, config.max_len, out / PACKED_DIR / "task")
    student_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = load_model(student_spec, device=device, dtype=student_dtype)
    align_path = config.align
    align_rows = None
    if config.distilling:
        with args.main_process_first(local=True, desc="writing and packing the alignment rows"):
            if align_path is None:  # the built-in rows; their helpful answers are the student's own
                align_path = _write_builtin_alignment(model, tokenizer, config, student_spec, out)
            align_rows = build_packed_rows(tokenizer, align_path, config.align_max_len or config.max_len,
                                           out / PACKED_DIR / "align")
    dataset = PairedRows(task_rows, align_rows)
    varlen = prepare_for_packing(model, device)
    # A teacher built on the student's own model shares its weights (engine/finetune/shared_teacher.py);
    # one built on another model is loaded whole, its adapter merged.
    shared = config.distilling and str(student_spec) == str(teacher_manifest["model"])
    if config.distilling and not shared:
        teacher = load_teacher(config.teacher, device=device, dtype=student_dtype, merge_adapter=True)
        prepare_for_packing(teacher.model, device)
        _check_same_vocabulary(tokenizer, teacher.tokenizer, model, teacher.model)

    model = add_lora(model, config)
    teacher_model = teacher.model if teacher is not None else None
    if shared:
        adapter = teacher_manifest.get("adapter")
        teacher_model = SharedBaseTeacher(model, Path(config.teacher) / adapter if adapter else None)
    if config.gradient_checkpointing:
        model.enable_input_require_grads()
    trainer_class = _make_trainer_class()
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=PackedPairCollator(tokenizer.pad_token_id, varlen=varlen),
        callbacks=list(callbacks),
        teacher=teacher_model,
        lam=config.lam if config.distilling else 0.0,
        temperature=config.temperature,
        direction=config.kl,
        beta=config.beta,
        chunk_size=config.chunk_size,
    )
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume_from)
    seconds = time.perf_counter() - started

    adapter_dir = out / ADAPTER_DIR
    # Every rank must end with the same adapter; a difference means the gradients were not synced.
    digests = gather_objects(parameter_digest(trainer.model))
    if len(set(digests)) > 1:
        log.error("the ranks ended with different adapters (%s); rank 0's is saved", ", ".join(digests))
    history = [{k: entry[k] for k in ("step", "loss", "ce", "kl") if k in entry}
               for entry in trainer.state.log_history if "loss" in entry]
    last = history[-1] if history else {}
    summary = {
        "format": FORMAT,
        "mode": "sft" if config.baseline == "sft" else "reft",
        "student": str(student_spec),
        "student_hash": model_fingerprint(student_spec),
        "teacher": str(config.teacher) if config.distilling else None,
        "teacher_manifest_sha256": teacher_sha if config.distilling else None,
        "data": str(config.data),
        "data_sha256": _file_sha256(config.data),
        "align": str(align_path) if config.distilling else None,
        "align_builtin": config.distilling and config.align is None,
        "align_sha256": _file_sha256(align_path) if config.distilling else None,
        "n_task_rows": task_rows.manifest["rows"],
        "n_task_rows_dropped": task_rows.manifest["dropped"],
        "n_align_rows": align_rows.manifest["rows"] if align_rows is not None else 0,
        "n_packed_rows": len(task_rows),
        "n_packed_align_rows": len(align_rows) if align_rows is not None else 0,
        "attention": "varlen" if varlen else "block-mask",
        "teacher_weights": ("shared with the student" if shared else "separate copy") if config.distilling else None,
        "config": {k: v for k, v in asdict(config).items() if k not in ("progress",)},
        "world_size": world_size(),
        "global_batch_rows": config.rows_per_step * config.grad_accum * world_size(),
        "adapter_sha256_per_rank": digests,
        "steps": int(trainer.state.global_step),
        "resumed_from": resume_from,
        "train_loss": float(result.training_loss),
        "final": {k: last[k] for k in ("loss", "ce", "kl") if k in last},
        "history": history,
        "seconds": round(seconds, 2),
        "adapter": str(adapter_dir),
    }
    if is_main_process():  # Trainer saved checkpoints from rank 0 only; so are the outputs
        trainer.model.save_pretrained(str(adapter_dir), selected_adapters=["default"])  # not the teacher's
        tokenizer.save_pretrained(str(adapter_dir))
        out.mkdir(parents=True, exist_ok=True)
        (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    barrier()  # every rank returns once the outputs exist
    return summary
