"""Teacher-guided finetuning (``refteacher finetune``): LoRA on packed user data + KL to the teacher.

One optimisation step of the student (the base model with a fresh peft LoRA adapter):

    loss = CE(student, packed rows of the kept user data)            (labels on responses only)
         + lambda * KL(teacher || student) on alignment data           (refusals to harmful prompts)

Both terms are computed from final hidden states (after the final norm) and LM-head weights, never
from full logits: the cross-entropy over the label positions only, a chunk at a time
(``refteacher.engine.losses``), the KL with ``refteacher.kernels.kl.fused_linear_kl`` over the
response tokens of the alignment rows. The teacher (its ReFT adapter merged) is frozen.

Training runs on transformers' ``Trainer`` with a custom ``compute_loss`` and data collator, so
checkpoints (``OUT/checkpoints/checkpoint-N``), gradient accumulation, logging, ``--resume`` and
accelerate / torchrun launches behave as users expect. Every dataset item is one packed task row
paired with one packed alignment row (alignment rows are cycled); the sampler shuffles items with
the run's seed, and a resumed run skips exactly the batches already seen.

``baseline="sft"`` is plain LoRA finetuning on the (unfiltered) data with no teacher and no KL.

Outputs under ``OUT``: ``adapter/`` (the student's LoRA adapter, loadable with
``PeftModel.from_pretrained``), ``finetune.json`` (configuration, inputs, figures) and
``checkpoints/``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from refteacher.engine.errors import UserError

log = logging.getLogger(__name__)

FORMAT = "refteacher.finetune/1"
ADAPTER_DIR = "adapter"
CHECKPOINT_DIR = "checkpoints"
SUMMARY_FILE = "finetune.json"
KL_DIRECTIONS = ("forward", "reverse", "jsd")
BASELINES = ("sft",)


@dataclass
class FinetuneConfig:
    """Everything a finetuning run needs; the CLI flags map one to one onto these fields."""

    data: str
    out: str
    student: str | None = None  # None: the teacher's model, else the default model
    teacher: str | None = None
    align: str | None = None
    baseline: str | None = None  # None (ReFT distillation) or "sft"
    lam: float = 1.0
    temperature: float = 1.0
    kl: str = "forward"
    beta: float = 0.5
    lora_r: int = 16
    lora_alpha: float | None = None  # None: 2 * lora_r
    lora_dropout: float = 0.0
    lora_targets: str = "all-linear"
    max_len: int = 1024
    align_max_len: int | None = None  # None: max_len
    rows_per_step: int = 1
    grad_accum: int = 1
    max_steps: int = 100
    learning_rate: float = 2e-4
    warmup_steps: int = 0
    weight_decay: float = 0.0
    save_steps: int = 50
    logging_steps: int = 10
    seed: int = 0
    resume: bool = False
    device: str | None = None
    chunk_size: int | None = None
    gradient_checkpointing: bool = False
    progress: bool = True

    def check(self) -> None:
        """Raise UserError for inconsistent or out-of-range settings, saying how to fix them."""
        if self.baseline is not None and self.baseline not in BASELINES:
            raise UserError(f"--baseline must be one of {', '.join(BASELINES)}, got {self.baseline!r}")
        if self.baseline == "sft":
            if self.teacher or self.align:
                raise UserError("--baseline sft trains without a teacher: drop --teacher and --align")
        else:
            if not self.teacher:
                raise UserError("finetuning with distillation needs --teacher DIR (or pass --baseline sft)")
            if not self.align and self.lam > 0:
                raise UserError("distillation needs --align FILE (harmful prompts with refusals); "
                                "or set --lambda 0 to train without the KL term")
        if self.kl not in KL_DIRECTIONS:
            raise UserError(f"--kl must be one of {', '.join(KL_DIRECTIONS)}, got {self.kl!r}")
        if self.kl == "jsd" and not 0 < self.beta < 1:
            raise UserError(f"--beta must lie strictly between 0 and 1 for --kl jsd, got {self.beta}")
        checks = [
            ("--lambda", self.lam, self.lam >= 0 and math.isfinite(self.lam), ">= 0"),
            ("--temperature", self.temperature, self.temperature > 0 and math.isfinite(self.temperature), "> 0"),
            ("--lora-r", self.lora_r, self.lora_r >= 1, ">= 1"),
            ("--max-len", self.max_len, self.max_len >= 8, ">= 8"),
            ("--rows-per-step", self.rows_per_step, self.rows_per_step >= 1, ">= 1"),
            ("--grad-accum", self.grad_accum, self.grad_accum >= 1, ">= 1"),
            ("--max-steps", self.max_steps, self.max_steps >= 1, ">= 1"),
            ("--learning-rate", self.learning_rate, self.learning_rate > 0, "> 0"),
        ]
        for flag, value, ok, rule in checks:
            if not ok:
                raise UserError(f"{flag} must be {rule}, got {value}")
        if self.align_max_len is not None and self.align_max_len < 8:
            raise UserError(f"--align-max-len must be >= 8, got {self.align_max_len}")

    @property
    def distilling(self) -> bool:
        """True when the run has a teacher and a KL term."""
        return self.baseline is None and self.lam > 0


# --------------------------------------------------------------------------------------------
# Data: rows -> token ids with response labels -> packed rows
# --------------------------------------------------------------------------------------------


def read_training_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a JSONL / CSV / Parquet file (or ``hf:NAME``) of chat rows; return the records in order.

    Each record has ``prompt`` + ``response`` or ``messages`` (see ``refteacher.engine.examples``).
    Raises UserError for an unreadable row (naming its id) or an empty file.
    """
    from refteacher.engine.data import iter_rows, open_source

    source = open_source(path)
    records = []
    for row in iter_rows(source):
        if row.reason is not None or row.record is None:
            raise UserError(f"{path}: row {row.id} cannot be used for training ({row.reason}); fix or drop it "
                            "(`refteacher filter` writes malformed rows to rejected.jsonl)")
        records.append(row.record)
    if not records:
        raise UserError(f"{path} holds no rows to train on")
    return records


def encode_rows(tokenizer, records: Sequence[dict[str, Any]], max_len: int, *, where: str = "data") -> list[tuple[list[int], list[int]]]:
    """Tokenise chat records into (input_ids, labels) pairs, truncated to ``max_len`` tokens.

    Labels are on assistant tokens only. Rows left with no label after truncation are dropped
    (logged); UserError when none survive.
    """
    from refteacher.engine.examples import IGNORE_INDEX, encode_example

    examples = []
    dropped = 0
    for index, record in enumerate(records):
        try:
            ids, labels = encode_example(tokenizer, record, max_tokens=max_len)
        except UserError as err:
            raise UserError(f"{where} row {index + 1}: {err}") from None
        if sum(1 for y in labels[1:] if y != IGNORE_INDEX) == 0:
            dropped += 1
            continue
        examples.append((ids, labels))
    if dropped:
        log.warning("%s: %d rows had no response tokens within %d tokens and were dropped", where, dropped, max_len)
    if not examples:
        raise UserError(f"{where}: no row has response tokens within --max-len {max_len}; raise --max-len")
    return examples


def pack_examples(examples: Iterable[tuple[list[int], list[int]]], max_len: int) -> list:
    """Pack (input_ids, labels) examples into ``PackedRow``s of at most ``max_len`` tokens."""
    from refteacher.engine.packing import pack_sequences

    return list(pack_sequences(examples, max_len, overflow="truncate"))


class PairedRows(torch.utils.data.Dataset):
    """Dataset item i = {"task": task_rows[i], "align": align_rows[i % len(align_rows)] or None}."""

    def __init__(self, task_rows: Sequence, align_rows: Sequence | None = None):
        if not task_rows:
            raise UserError("no packed training rows; the data is empty")
        self.task_rows = list(task_rows)
        self.align_rows = list(align_rows) if align_rows else []

    def __len__(self) -> int:
        return len(self.task_rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        align = self.align_rows[index % len(self.align_rows)] if self.align_rows else None
        return {"task": self.task_rows[index], "align": align}


class PackedPairCollator:
    """Collate PairedRows items into one step's tensors.

    Returns ``input_ids``, ``labels``, ``position_ids`` ([R, L] long, or [1, T] when ``varlen``)
    for the task rows and, when the items carry alignment rows, the same under ``align_*`` keys.
    No attention mask: attention keeps to each example through ``position_ids``
    (``refteacher.engine.attention``).
    """

    def __init__(self, pad_token_id: int, varlen: bool = False):
        self.pad_token_id = int(pad_token_id)
        self.varlen = bool(varlen)

    def _collate(self, rows: Sequence) -> dict[str, torch.Tensor]:
        from refteacher.engine.packing import collate_packed

        batch = collate_packed(rows, self.pad_token_id, flatten=self.varlen)
        return {k: batch[k] for k in ("input_ids", "labels", "position_ids")}

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self._collate([item["task"] for item in items])
        aligns = [item["align"] for item in items if item.get("align") is not None]
        if aligns:
            for key, value in self._collate(aligns).items():
                batch[f"align_{key}"] = value
        return batch


# --------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------


def task_cross_entropy(model, batch: dict[str, torch.Tensor], *, chunk_size: int | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy of ``model`` over the labelled tokens of packed task rows.

    ``batch`` holds ``input_ids``, ``labels``, ``position_ids`` ([R, L] long). Returns a float32
    scalar; no [tokens, V] logits are built.
    """
    from refteacher.engine.attention import final_hidden_states, lm_head_of
    from refteacher.engine.losses import DEFAULT_CHUNK, linear_cross_entropy, shifted_targets

    hidden = final_hidden_states(model, batch["input_ids"], batch["position_ids"])
    mask, targets = shifted_targets(batch["labels"])
    weight, bias = lm_head_of(model)
    return linear_cross_entropy(hidden[mask], weight, targets, bias=bias, chunk_size=chunk_size or DEFAULT_CHUNK)


def alignment_kl(
    student,
    teacher,
    batch: dict[str, torch.Tensor],
    *,
    temperature: float = 1.0,
    direction: str = "forward",
    beta: float = 0.5,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """KL between teacher and student next-token distributions on the response tokens of alignment rows.

    ``batch`` holds ``align_input_ids``, ``align_labels``, ``align_position_ids`` ([R, L] long).
    The teacher runs without gradient. Returns the float32 mean over response tokens of
    ``T**2 * D`` (D = KL(teacher||student) for "forward"; see ``fused_linear_kl``).
    """
    from refteacher.engine.attention import final_hidden_states, lm_head_of
    from refteacher.engine.losses import shifted_targets
    from refteacher.kernels.kl import fused_linear_kl

    ids, positions = batch["align_input_ids"], batch["align_position_ids"]
    mask, _ = shifted_targets(batch["align_labels"])
    student_hidden = final_hidden_states(student, ids, positions)[mask]
    with torch.no_grad():
        teacher_hidden = final_hidden_states(teacher, ids, positions)[mask]
    student_weight, student_bias = lm_head_of(student)
    teacher_weight, teacher_bias = lm_head_of(teacher)
    teacher_hidden = teacher_hidden.to(student_hidden.dtype)
    return fused_linear_kl(
        student_hidden, student_weight.to(student_hidden.dtype),
        teacher_hidden, teacher_weight.to(student_hidden.dtype),
        temperature=temperature, direction=direction, beta=beta, reduction="mean",
        chunk_size=chunk_size, student_bias=student_bias, teacher_bias=teacher_bias,
    )


def _make_trainer_class():
    """Build the Trainer subclass lazily (transformers is imported only when training)."""
    from transformers import Trainer

    class DistillTrainer(Trainer):
        """transformers' Trainer with the ReFT loss: CE on packed task rows + lambda * KL on alignment rows."""

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

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            ce = task_cross_entropy(model, inputs, chunk_size=self.chunk_size)
            loss = ce
            self._parts["ce"].append(float(ce.detach()))
            if self.teacher is not None and self.lam > 0 and "align_input_ids" in inputs:
                kl = alignment_kl(model, self.teacher, inputs, temperature=self.temperature,
                                  direction=self.direction, beta=self.beta, chunk_size=self.chunk_size)
                loss = ce + self.lam * kl
                self._parts["kl"].append(float(kl.detach()))
            return (loss, {"loss": loss}) if return_outputs else loss

        def log(self, logs: dict[str, float], *args, **kwargs) -> None:
            if "loss" in logs:
                for name, values in self._parts.items():
                    if values:
                        logs[name] = round(sum(values) / len(values), 6)
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
    from refteacher.engine.attention import lm_head_of

    vs, vt = lm_head_of(student_model)[0].shape[0], lm_head_of(teacher_model)[0].shape[0]
    probe = "Hello! How do I bake bread? <|im_start|>user 12345"
    if vs != vt or student_tokenizer(probe)["input_ids"] != teacher_tokenizer(probe)["input_ids"]:
        raise UserError(f"student and teacher use different vocabularies ({vs} vs {vt} logits); "
                        "distillation needs a teacher built on the same tokenizer as the student")


def add_lora(model, config: FinetuneConfig):
    """Wrap ``model`` with a fresh trainable LoRA adapter (peft); return the PeftModel."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha if config.lora_alpha is not None else 2 * config.lora_r,
        lora_dropout=config.lora_dropout,
        target_modules=config.lora_targets if config.lora_targets == "all-linear" else config.lora_targets.split(","),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def _resolve_student(config: FinetuneConfig, teacher_manifest: dict[str, Any] | None) -> str:
    from refteacher.engine.models import DEFAULT_MODEL

    if config.student:
        return config.student
    if teacher_manifest is not None:
        return str(teacher_manifest["model"])
    return DEFAULT_MODEL


def _latest_checkpoint(folder: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(folder)) if folder.is_dir() else None


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def run_finetune(config: FinetuneConfig, *, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Finetune the student as ``config`` says; write OUT/adapter and OUT/finetune.json; return the summary.

    ``callbacks`` are extra transformers ``TrainerCallback``s. Raises UserError for bad settings
    or inputs, and for ``resume`` without a checkpoint.
    """
    from transformers import TrainingArguments, set_seed

    from refteacher.engine.attention import prepare_for_packing
    from refteacher.engine.models import default_device, load_model, load_tokenizer, model_fingerprint
    from refteacher.engine.teacher_dir import load_teacher, read_manifest

    config.check()
    out = Path(config.out)
    checkpoints = out / CHECKPOINT_DIR
    resume_from = None
    if config.resume:
        resume_from = _latest_checkpoint(checkpoints)
        if resume_from is None:
            raise UserError(f"--resume: no checkpoint under {checkpoints}; run without --resume to start")
    elif _latest_checkpoint(checkpoints) is not None:
        raise UserError(f"{checkpoints} already holds checkpoints; pass --resume to continue that run "
                        "or choose another --out")
    device = torch.device(config.device) if config.device else default_device()
    set_seed(config.seed)

    teacher = None
    teacher_manifest = None
    teacher_sha = None
    if config.teacher and config.baseline is None:
        teacher_manifest, teacher_sha = read_manifest(config.teacher)
    student_spec = _resolve_student(config, teacher_manifest)
    # Rows are read before any model loads, so a bad file fails in a second, not after a load.
    task_records = read_training_rows(config.data)
    align_records = read_training_rows(config.align) if config.distilling else None
    tokenizer = load_tokenizer(student_spec)
    student_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = load_model(student_spec, device=device, dtype=student_dtype)
    varlen = prepare_for_packing(model, device)
    if config.distilling:
        teacher = load_teacher(config.teacher, device=device, dtype=student_dtype, merge_adapter=True)
        prepare_for_packing(teacher.model, device)
        _check_same_vocabulary(tokenizer, teacher.tokenizer, model, teacher.model)

    task_rows = pack_examples(encode_rows(tokenizer, task_records, config.max_len, where=str(config.data)), config.max_len)
    align_rows = None
    n_align = 0
    if config.distilling:
        align_len = config.align_max_len or config.max_len
        n_align = len(align_records)
        align_rows = pack_examples(encode_rows(tokenizer, align_records, align_len, where=str(config.align)), align_len)
    dataset = PairedRows(task_rows, align_rows)

    model = add_lora(model, config)
    if config.gradient_checkpointing:
        model.enable_input_require_grads()
    args = TrainingArguments(
        output_dir=str(checkpoints),
        max_steps=config.max_steps,
        per_device_train_batch_size=config.rows_per_step,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.learning_rate,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        logging_steps=config.logging_steps,
        save_steps=config.save_steps,
        save_total_limit=2,
        seed=config.seed,
        data_seed=config.seed,
        remove_unused_columns=False,
        report_to=[],
        use_cpu=device.type == "cpu",
        bf16=device.type == "cuda",
        dataloader_num_workers=0,
        disable_tqdm=not config.progress,
        **({"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}}
           if config.gradient_checkpointing else {}),
    )
    trainer_class = _make_trainer_class()
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=PackedPairCollator(tokenizer.pad_token_id, varlen=varlen),
        callbacks=list(callbacks),
        teacher=teacher.model if teacher is not None else None,
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
    trainer.model.save_pretrained(str(adapter_dir))
    tokenizer.save_pretrained(str(adapter_dir))
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
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
        "align": str(config.align) if config.distilling else None,
        "align_sha256": _file_sha256(config.align) if config.distilling else None,
        "n_task_rows": len(task_records),
        "n_align_rows": n_align,
        "n_packed_rows": len(task_rows),
        "attention": "varlen" if varlen else "block-mask",
        "config": {k: v for k, v in asdict(config).items() if k not in ("progress",)},
        "steps": int(trainer.state.global_step),
        "resumed_from": resume_from,
        "train_loss": float(result.training_loss),
        "final": {k: last[k] for k in ("loss", "ce", "kl") if k in last},
        "seconds": round(seconds, 2),
        "adapter": str(adapter_dir),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def add_cli(subparsers) -> None:
    """Register ``refteacher finetune``."""
    p = subparsers.add_parser(
        "finetune",
        help="LoRA-finetune a student on kept data, distilling the teacher's alignment (ReFT)",
        description=(
            "Finetune the student (base model + a fresh LoRA adapter) on the user's kept data with "
            "next-token cross-entropy on packed rows, plus lambda * KL(teacher || student) on the "
            "response tokens of alignment data (harmful prompts answered with refusals). Writes "
            "OUT/adapter, OUT/finetune.json and OUT/checkpoints. With --baseline sft: plain LoRA "
            "finetuning on --data with no teacher."
        ),
    )
    p.add_argument("--student", default=None, help="student model (directory, hub id or alias); default: the teacher's model")
    p.add_argument("--teacher", default=None, help="teacher directory written by `refteacher teacher`")
    p.add_argument("--data", required=True, help="training rows (JSONL/CSV/Parquet, prompt+response or messages)")
    p.add_argument("--align", default=None, help="alignment rows: harmful prompts with refusal responses")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--lambda", dest="lam", type=float, default=1.0, help="weight of the KL term")
    p.add_argument("--temperature", type=float, default=1.0, help="distillation temperature (loss scaled by T^2)")
    p.add_argument("--kl", choices=KL_DIRECTIONS, default="forward", help="divergence: forward KL(teacher||student), reverse, or jsd")
    p.add_argument("--beta", type=float, default=0.5, help="teacher weight of the JSD mixture (--kl jsd)")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default 2 * rank)")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout")
    p.add_argument("--lora-targets", default="all-linear", help="comma-separated module names, or all-linear")
    p.add_argument("--max-len", type=int, default=1024, help="tokens per packed row (longer rows are truncated)")
    p.add_argument("--align-max-len", type=int, default=None, help="tokens per packed alignment row (default --max-len)")
    p.add_argument("--rows-per-step", type=int, default=1, help="packed rows per device per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--max-steps", type=int, default=100, help="optimiser steps")
    p.add_argument("--learning-rate", type=float, default=2e-4, help="peak learning rate (linear decay)")
    p.add_argument("--warmup-steps", type=int, default=0, help="learning-rate warm-up steps")
    p.add_argument("--save-steps", type=int, default=50, help="checkpoint every N steps")
    p.add_argument("--logging-steps", type=int, default=10, help="log losses every N steps")
    p.add_argument("--seed", type=int, default=0, help="random seed (LoRA init, data order)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in OUT/checkpoints")
    p.add_argument("--baseline", choices=BASELINES, default=None, help="sft: plain finetuning, no teacher (for comparison)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations to save memory")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    p.set_defaults(func=_cli_finetune)


def _cli_finetune(args: argparse.Namespace) -> int:
    names = {f.name for f in FinetuneConfig.__dataclass_fields__.values()}
    config = FinetuneConfig(**{k: v for k, v in vars(args).items() if k in names})
    summary = run_finetune(config)
    final = ", ".join(f"{k} {v:.4f}" for k, v in summary["final"].items())
    print(f"finetuned {summary['mode']} for {summary['steps']} steps in {summary['seconds']:.0f} s ({final}); "
          f"adapter in {summary['adapter']}")
    return 0
