"""The ReFT teacher: LoRA on an aligned model, trained with refusal SFT + the feature loss.

``L = CE(responses) + lambda * L_feat`` where

- CE is the next-token loss on harmful prompts answered with refusals (engine/refusals.py) and
  harmless prompts answered with the model's own cached greedy answers (helpfulness kept);
- ``L_feat`` pushes ``cos(f_l(x), R_l)`` (last prompt token, feature layer ``l``) above
  ``harmful_target`` for harmful prompts and below ``margin`` for harmless ones; ``R_l`` is the
  difference of means re-estimated from the current teacher every ``refresh_every`` steps (the
  paper's dynamic feature). A hinge at 0.5 rather than a pull to 1 stops fitting once a prompt
  is clearly on the harmful side, which carries over better to prompts of unseen sources.

``anchor_weight > 0`` adds ``anchor_loss``: the feature-layer states of the batch are held near the
untouched model's. Off by default: it lifts left-out HarmBench and lowers left-out matched pairs
(figures in benchmarks/results/eval_teacher_ablations.json).

LoRA sits only on the decoder layers below the feature layer, so the filter's forward pass (which
stops at layer ``l``) sees every change the teacher learned. The threshold is calibrated on a
held-out calibration split (false-positive rate <= 0.05 on its harmless prompts by default, or a
target recall), and the result is written with ``save_teacher_dir``.

Training runs on transformers' ``Trainer``, as the finetune does (engine/modeling/hf_trainer.py
holds what the two share): ``TeacherTrainer.compute_loss`` computes the loss above on one
micro-batch, ``StepBatches`` draws each micro-batch's prompts and CE examples from the seed alone,
and ``FeatureRefresh`` (a ``TrainerCallback``) re-estimates the feature every ``refresh_every``
steps and saves it, with the per-step loss history, into each ``checkpoint-N`` folder (safetensors
+ JSON) under ``OUT.teacher-checkpoint``, every ``checkpoint_every`` steps. A rerun of the same
build resumes from the last checkpoint and gives the same teacher as an uninterrupted run; the
checkpoints of a different build (other data, config or model) are removed, not resumed.

Under torchrun or ``accelerate launch`` each rank draws its own micro-batches (Trainer shards
the StepBatches items), the gradients are averaged over the ranks, and rank 0 writes the
teacher directory: W processes with ``grad_accum`` A train as one process with W * A.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from refteacher.engine.data.chat_examples import encode_example
from refteacher.engine.data.prompt_sets import load_prompt_set, prompt_set_hash, split_records
from refteacher.engine.errors import UserError
from refteacher.engine.modeling.chat_prompts import encode_prompts, pad_token_id
from refteacher.engine.modeling.distributed import barrier, is_main_process, mean_across_ranks, unwrap_model, world_size
from refteacher.engine.modeling.forward import num_layers
from refteacher.engine.modeling.hf_trainer import (
    RankSyncedSteps,
    latest_checkpoint,
    silence_log_printing,
    training_arguments,
)
from refteacher.engine.modeling.loading import load_model, load_tokenizer, model_fingerprint
from refteacher.engine.modeling.prompt_states import PrefixCache, last_token_states, prompt_hidden
from refteacher.engine.modeling.teacher_dir import save_teacher_dir
from refteacher.engine.teacher.calibration import calibrate
from refteacher.engine.teacher.config import DEFAULT_SETS, HARMFUL_SAMPLING, TeacherConfig, TeacherResult
from refteacher.engine.teacher.feature import category_directions, difference_of_means
from refteacher.engine.teacher.objective import anchor_loss, feature_loss, response_ce
from refteacher.engine.teacher.refusals import refusal_for
from refteacher.engine.teacher.training_data import build_teacher_data, cached_answers
from refteacher.kernels.cosine import refusal_scores

CHECKPOINT_DIR = ".teacher-checkpoint"
FEATURE_STATE_FILE = "teacher_feature.safetensors"
STEP_STATE_FILE = "teacher_state.json"
LOGGED_PARTS = ("feature_loss", "ce_loss", "anchor_loss")


# ----------------------------------------------------------------------------- batches


def _encode(tokenizer, prompts: Sequence[str], max_tokens: int) -> list[list[int]]:
    return encode_prompts(tokenizer, list(prompts), max_tokens=max_tokens)[0]


def category_groups(categories: Sequence[str | None]) -> list[list[int]]:
    """Indices of ``categories`` grouped by value (None is a group of its own), groups in first-seen order."""
    groups: dict[str | None, list[int]] = {}
    for i, category in enumerate(categories):
        groups.setdefault(category, []).append(i)
    return list(groups.values())


def balanced_sample(rng: random.Random, groups: Sequence[Sequence[int]], count: int) -> list[int]:
    """Up to ``count`` distinct indices drawn so that each group is equally likely, whatever its size.

    The groups are visited in a shuffled order, round after round, taking a random member not yet
    taken from each; a group runs dry when all its members are taken. Every index comes from ``groups``.
    """
    order = rng.sample(range(len(groups)), len(groups))
    pools = [rng.sample(list(group), len(group)) for group in groups]
    count = min(count, sum(len(pool) for pool in pools))
    chosen: list[int] = []
    for round_ in range(max((len(pool) for pool in pools), default=0)):
        for g in order:
            if len(chosen) == count:
                return chosen
            if round_ < len(pools[g]):
                chosen.append(pools[g][round_])
    return chosen


class StepBatches(torch.utils.data.Dataset):
    """Item ``m``: micro-batch ``m``'s feature-loss prompts and CE examples, drawn from the seed alone.

    Half of ``feature_batch`` harmful and half harmless prompts (token ids), and half of ``ce_batch``
    refusal and half helpful-answer examples, sampled with ``random.Random("teacher-step-SEED-m")``:
    a micro-batch does not depend on the ones before it, so a resumed run that skips the first
    micro-batches sees exactly what an uninterrupted one does. Read in order (a sequential sampler)
    with one item per micro-batch; without gradient accumulation micro-batch ``m`` is step ``m``.

    ``harmful_groups`` (index lists into ``harmful_ids``, which ``ce_refusals`` follows one to one)
    draws the harmful prompts and refusals group-balanced (``balanced_sample``) rather than uniformly.
    """

    def __init__(self, harmful_ids: list[list[int]], harmless_ids: list[list[int]], ce_refusals: list,
                 ce_answers: list, *, feature_batch: int, ce_batch: int, seed: int, length: int,
                 harmful_groups: list[list[int]] | None = None):
        self.harmful_ids, self.harmless_ids = harmful_ids, harmless_ids
        self.ce_refusals, self.ce_answers = ce_refusals, ce_answers
        self.half_f, self.half_c = max(1, feature_batch // 2), max(1, ce_batch // 2)
        self.with_ce = ce_batch > 0 and bool(ce_refusals or ce_answers)
        self.seed, self.length = seed, length
        self.harmful_groups = harmful_groups

    def _harmful(self, rng: random.Random, count: int) -> list[int]:
        if self.harmful_groups is None:
            return rng.sample(range(len(self.harmful_ids)), min(count, len(self.harmful_ids)))
        return balanced_sample(rng, self.harmful_groups, count)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, m: int) -> dict:
        rng = random.Random(f"teacher-step-{self.seed}-{m}")
        hb = self._harmful(rng, self.half_f)
        bb = rng.sample(range(len(self.harmless_ids)), min(self.half_f, len(self.harmless_ids)))
        item = {"prompt_ids": [self.harmful_ids[i] for i in hb] + [self.harmless_ids[i] for i in bb],
                "n_harmful": len(hb), "ce_examples": []}
        if self.with_ce:
            refusals, answers = self.ce_refusals, self.ce_answers
            chosen = [refusals[i] for i in self._harmful(rng, self.half_c)]
            chosen += [answers[i] for i in rng.sample(range(len(answers)), min(self.half_c, len(answers)))]
            item["ce_examples"] = chosen
        return item


def _one_item(items: list[dict]) -> dict:
    """The collator: each DataLoader batch is one StepBatches item (batch size 1)."""
    return items[0]


# ----------------------------------------------------------------------------- trainer


class FeatureRefresh(TrainerCallback):
    """The refusal feature the feature loss scores against, and the per-step loss history.

    Re-estimates the feature from the current teacher at the start of every ``refresh_every``-th
    step (the paper's dynamic feature), records one history entry per step (the mean of its
    micro-batches' parts), calls ``on_step(steps_done, peft_model, estimate)`` after each step,
    stops (with a checkpoint) after ``stop_after`` steps, and writes the feature and the history
    into every checkpoint folder the Trainer saves; ``restore`` reads them back on resume.
    """

    def __init__(self, estimate: Callable[[], torch.Tensor], *, refresh_every: int, fingerprint: str,
                 peft_model, on_step=None, stop_after: int | None = None):
        self.estimate = estimate
        self.refresh_every = refresh_every
        self.fingerprint = fingerprint
        self.peft_model = peft_model
        self.on_step = on_step
        self.stop_after = stop_after
        self.feature: torch.Tensor | None = None
        self.history: list[dict[str, float]] = []
        self._parts: list[dict[str, float]] = []

    def record(self, parts: dict[str, float]) -> None:
        """Note one micro-batch's loss parts (called by ``TeacherTrainer.compute_loss``)."""
        self._parts.append(parts)

    def on_step_begin(self, args, state, control, **kwargs):
        step = state.global_step
        if self.feature is None or (step > 0 and step % self.refresh_every == 0):
            self.feature = self.estimate()

    def on_step_end(self, args, state, control, **kwargs):
        parts, self._parts = self._parts, []
        means = {key: sum(p[key] for p in parts) / max(1, len(parts)) for key in ("loss",) + LOGGED_PARTS}
        # Every rank ends every step: the mean over ranks is the step's loss over the global batch.
        self.history.append({"step": state.global_step, **mean_across_ranks(means)})
        if self.on_step is not None:
            self.on_step(state.global_step, self.peft_model, self.estimate)
        if self.stop_after is not None and self.stop_after <= state.global_step < state.max_steps:
            control.should_save = True
            control.should_training_stop = True

    def on_save(self, args, state, control, **kwargs):
        if not args.should_save:
            return
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        save_file({"feature": self.feature.detach().cpu().float().contiguous()}, str(folder / FEATURE_STATE_FILE))
        (folder / STEP_STATE_FILE).write_text(json.dumps({"step": state.global_step, "fingerprint": self.fingerprint,
                                                          "history": self.history}))

    def restore(self, checkpoint: str | Path, device) -> None:
        """Take the feature and the history from a checkpoint folder this callback saved."""
        folder = Path(checkpoint)
        self.feature = load_file(str(folder / FEATURE_STATE_FILE))["feature"].to(device)
        self.history = list(json.loads((folder / STEP_STATE_FILE).read_text())["history"])


FEATURE_BATCH_PADDING = 0.25  # most padding a length group of a feature batch may hold


class TeacherTrainer(RankSyncedSteps, Trainer):
    """transformers' Trainer with the teacher's loss on one StepBatches item:
    ``CE + feature_weight * feature_loss (+ anchor_weight * anchor_loss)``.

    The loss runs the peft model unwrapped (early exit, prefix cache); in a DDP run
    ``RankSyncedSteps`` averages its gradients over the ranks.
    """

    def __init__(self, *args, refresh: FeatureRefresh, config: TeacherConfig, layer: int, pad_id: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.refresh = refresh
        self.teacher_config = config
        self.layer = layer
        self.pad_id = pad_id
        # compute_loss returns a per-micro-batch mean: let Trainer divide by the accumulation steps.
        self.model_accepts_loss_kwargs = False
        self._logged_through = 0

    def _states(self, model, ids: list[list[int]]) -> torch.Tensor:
        """States [B, H] of one batch after the feature layer; grads flow (through the shared prefix too).

        The batch runs in length groups: a few long prompts (jailbreak framings reach
        max_prompt_tokens) would otherwise pad every short one to their length."""
        prefix = PrefixCache.shared_by(model, ids, self.layer)
        return last_token_states(model, ids, self.pad_id, [self.layer], prefix, max_padding=FEATURE_BATCH_PADDING)[0]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        model = unwrap_model(model)
        config = self.teacher_config
        ids, n_harmful = inputs["prompt_ids"], inputs["n_harmful"]
        hidden = self._states(model, ids)
        scores = refusal_scores(hidden.float(), self.refresh.feature.to(hidden.device))
        labels = torch.tensor([1] * n_harmful + [0] * (len(ids) - n_harmful), device=hidden.device)
        l_feat = feature_loss(scores, labels, config.margin, config.harmful_target)
        loss = config.feature_weight * l_feat
        l_anchor = torch.zeros(())
        if config.anchor_weight > 0:
            with torch.no_grad(), self.refresh.peft_model.disable_adapter():
                untouched = self._states(model, ids)
            l_anchor = anchor_loss(hidden, untouched)
            loss = loss + config.anchor_weight * l_anchor
        l_ce = torch.zeros(())
        if inputs["ce_examples"]:
            l_ce = response_ce(model, inputs["ce_examples"], self.pad_id)
            loss = loss + l_ce
        self.refresh.record({"loss": float(loss.detach()), "feature_loss": float(l_feat.detach()),
                             "ce_loss": float(l_ce.detach()), "anchor_loss": float(l_anchor.detach())})
        return (loss, {"loss": loss}) if return_outputs else loss

    def floating_point_ops(self, inputs) -> int:
        return 0  # items carry token id lists, not the input_ids tensor Trainer's estimate reads

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:
            recent = [h for h in self.refresh.history if h["step"] > self._logged_through]
            for key in LOGGED_PARTS:
                if recent:
                    logs[key] = round(sum(h[key] for h in recent) / len(recent), 6)
            if recent:
                self._logged_through = recent[-1]["step"]
        super().log(logs, *args, **kwargs)


# ----------------------------------------------------------------------------- training


def _default_layer(total_layers: int) -> int:
    """The default feature layer: two thirds of the depth (20 of SmolLM2's 30), at least 1.

    Chosen by left-out AUROC per layer (docs/ablations.md, "Feature layer").
    """
    return max(1, round(2 * total_layers / 3))


def _fingerprint(config: TeacherConfig, data, model_hash: str) -> str:
    payload = json.dumps([config.manifest(), model_hash, data.train_harmful, data.train_harmless,
                          data.ce_harmless], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def teacher_data_for(config: TeacherConfig, harmful_records: Sequence, harmless_records: Sequence):
    """The TeacherData (training, CE and calibration prompt lists) a build with ``config`` uses
    on these labelled PromptRecords; deterministic, so a built teacher's split can be rebuilt."""
    return build_teacher_data(
        harmful_records, harmless_records, calib_fraction=config.calib_fraction,
        rephrase_per_prompt=config.rephrase_per_prompt, template_harmless=config.template_harmless,
        ce_harmless=config.ce_harmless, calib_rephrase=config.calib_rephrase,
        calib_max_harmful=config.calib_max_harmful, seed=config.build_data_seed,
    )


def _reference_sample(prompt_ids: list[list[int]], size: int, seed: int, tag: str,
                      groups: list[list[int]] | None = None) -> list[list[int]]:
    rng = random.Random(f"reference-{tag}-{seed}")
    if groups is None:
        chosen = rng.sample(range(len(prompt_ids)), min(size, len(prompt_ids)))
    else:
        chosen = balanced_sample(rng, groups, size)
    return [prompt_ids[i] for i in sorted(chosen)]


def train_teacher(
    model_spec: str,
    harmful_records: Sequence,
    harmless_records: Sequence,
    out_dir: str | os.PathLike,
    config: TeacherConfig | None = None,
    *,
    model=None,
    tokenizer=None,
    progress: bool = True,
    stop_after: int | None = None,
    on_step=None,
) -> TeacherResult:
    """Train a ReFT teacher on labelled PromptRecords and write its teacher directory.

    ``model``/``tokenizer`` may be passed pre-loaded (they are not modified: LoRA is added to a
    peft wrapper and removed afterwards). ``stop_after`` ends training after that many steps
    without writing the teacher (for tests of resuming; the checkpoint stays). ``on_step``, if
    given, is called as ``on_step(steps_done, peft_model, estimate_feature)`` after every step
    (``estimate_feature()`` returns the current teacher's feature [H] float32), so a caller can
    watch held-out figures during training. Returns the figures.
    """
    config = config or TeacherConfig()
    if config.threads:
        torch.set_num_threads(config.threads)
    if config.max_steps < 0:
        raise UserError(f"--max-steps must be >= 0, got {config.max_steps}")
    if config.anchor_weight < 0:
        raise UserError(f"--anchor-weight must be >= 0, got {config.anchor_weight}")
    if config.harmful_sampling not in HARMFUL_SAMPLING:
        raise UserError(f"--harmful-sampling must be one of {', '.join(HARMFUL_SAMPLING)}, got {config.harmful_sampling!r}")
    if config.grad_accum < 1 or config.checkpoint_every < 1:
        raise UserError(f"--grad-accum and --checkpoint-every must be >= 1, got {config.grad_accum} "
                        f"and {config.checkpoint_every}")
    started = time.perf_counter()
    out = Path(out_dir)
    torch.manual_seed(config.seed)
    if model is None:
        model = load_model(model_spec)
    if tokenizer is None:
        tokenizer = load_tokenizer(model_spec)
    model_hash = model_fingerprint(model_spec)
    total_layers = num_layers(model)
    layer = config.layer if config.layer is not None else _default_layer(total_layers)
    if not 1 <= layer <= total_layers:
        raise UserError(f"--layer must be in 1..{total_layers} for this model, got {layer}")
    pad_id = pad_token_id(tokenizer)

    data = teacher_data_for(config, harmful_records, harmless_records)
    if not data.calib_harmful or not data.calib_harmless:
        raise UserError("the calibration split is empty; give more prompts or a larger --calib-fraction")
    harmful_groups = None
    if config.harmful_sampling == "category":
        if not any(data.train_harmful_categories):
            raise UserError("--harmful-sampling category needs hazard categories on the harmful prompts: the built-in "
                            "sets carry them (`refteacher teacher --help` lists them), prompt files do not")
        harmful_groups = category_groups(data.train_harmful_categories)
    answers = cached_answers(model, tokenizer, data.ce_harmless, model_hash=model_hash,
                             max_new_tokens=config.answer_tokens, progress=progress)
    harmful_ids = _encode(tokenizer, data.train_harmful, config.max_prompt_tokens)
    harmless_ids = _encode(tokenizer, data.train_harmless, config.max_prompt_tokens)
    ce_refusals = [encode_example(tokenizer, {"prompt": p, "response": refusal_for(p, seed=config.seed)},
                                  max_tokens=config.max_prompt_tokens + 48) for p in data.train_harmful]
    ce_answers = [encode_example(tokenizer, {"prompt": p, "response": a}, max_tokens=config.max_prompt_tokens + config.answer_tokens + 8)
                  for p, a in zip(data.ce_harmless, answers) if a.strip()]

    base = model
    for p in base.parameters():
        p.requires_grad_(False)
    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                      target_modules=list(config.lora_targets), layers_to_transform=list(range(layer)),
                      bias="none")
    torch.manual_seed(config.seed)
    peft_model = get_peft_model(base, lora)
    peft_model.train()

    ref_harmful = _reference_sample(harmful_ids, config.reference_size, config.seed, "harmful", harmful_groups)
    ref_harmless = _reference_sample(harmless_ids, config.reference_size, config.seed, "harmless")

    def estimate_feature() -> torch.Tensor:
        was = peft_model.training
        peft_model.eval()
        h = prompt_hidden(peft_model, ref_harmful, pad_id, layer)
        b = prompt_hidden(peft_model, ref_harmless, pad_id, layer)
        peft_model.train(was)
        return difference_of_means(h, b)

    fingerprint = _fingerprint(config, data, model_hash)
    checkpoints = out.parent / f"{out.name}{CHECKPOINT_DIR}"
    refresh = FeatureRefresh(estimate_feature, refresh_every=config.refresh_every, fingerprint=fingerprint,
                             peft_model=peft_model, on_step=on_step, stop_after=stop_after)
    if config.max_steps > 0:
        resume_from = _resumable_checkpoint(checkpoints, fingerprint)
        if resume_from is not None:
            refresh.restore(resume_from, next(peft_model.parameters()).device)
        else:
            if is_main_process():
                shutil.rmtree(checkpoints, ignore_errors=True)  # another build's, or none
            barrier()
            refresh.feature = estimate_feature()
        trainer = _teacher_trainer(peft_model, refresh, config, layer, pad_id, checkpoints, progress,
                                   StepBatches(harmful_ids, harmless_ids, ce_refusals, ce_answers,
                                               feature_batch=config.feature_batch, ce_batch=config.ce_batch,
                                               seed=config.seed, length=0, harmful_groups=harmful_groups))
        trainer.train(resume_from_checkpoint=resume_from)
        if stop_after is not None and trainer.state.global_step < config.max_steps:
            _remove_lora(peft_model)
            return TeacherResult(path=checkpoints, layer=layer, threshold=float("nan"), calibration={},
                                 history=refresh.history)
    history = refresh.history

    # Final feature from the trained teacher, then the threshold on the calibration split.
    peft_model.eval()
    feature = estimate_feature()
    calib_h = prompt_hidden(peft_model, _encode(tokenizer, data.calib_harmful, config.max_prompt_tokens), pad_id, layer,
                            progress=progress, desc="calibrating (harmful)")
    calib_b = prompt_hidden(peft_model, _encode(tokenizer, data.calib_harmless, config.max_prompt_tokens), pad_id, layer,
                            progress=progress, desc="calibrating (harmless)")
    # The hinge leaves the harmless calibration prompts piled just under ``margin``, and benign
    # prompts of unseen kinds scatter around that pile, so a rate-based threshold taken inside it
    # flags many of them (left-out HarmBench, seed 2: FPR 0.18 on edgy-benign at -0.117): never go
    # below the margin (plus ``threshold_gap``; benchmarks/threshold_rules.py compares gaps).
    # The anchor holds harmless states where the untouched model has them (no pile at the margin, and
    # every score lower), so an anchored teacher takes the rule's threshold as it is.
    floor = config.margin + config.threshold_gap if config.anchor_weight == 0 else None
    threshold, calibration = calibrate(refusal_scores(calib_h, feature.cpu()), refusal_scores(calib_b, feature.cpu()),
                                       target_recall=config.target_recall, target_fpr=config.target_fpr, floor=floor)
    seconds = time.perf_counter() - started
    extra = {
        "teacher": {"config": config.manifest(), "steps": config.max_steps, "world_size": world_size(),
                    "history": history, "build_seconds": round(seconds, 1), "torch_threads": torch.get_num_threads(),
                    "counts": data.counts},
        "inputs": {"harmful_sha256": prompt_set_hash(list(harmful_records)),
                   "harmless_sha256": prompt_set_hash(list(harmless_records)),
                   "harmful_sources": sorted({r.source for r in harmful_records}),
                   "harmless_sources": sorted({r.source for r in harmless_records})},
    }
    directions = category_directions(calib_h, data.calib_harmful_categories)
    path = out
    if is_main_process():  # every rank holds the same teacher; one writes it
        path = save_teacher_dir(out, model_spec=str(model_spec), model_hash=model_hash, feature=feature, layer=layer,
                                threshold=threshold, calibration=calibration, adapter_model=peft_model, extra=extra,
                                categories=directions)
        shutil.rmtree(checkpoints, ignore_errors=True)
    barrier()
    _remove_lora(peft_model)
    return TeacherResult(path=path, layer=layer, threshold=threshold, calibration=calibration, history=history,
                         seconds=seconds)


def _teacher_trainer(peft_model, refresh: FeatureRefresh, config: TeacherConfig, layer: int, pad_id: int,
                     checkpoints: Path, progress: bool, batches: StepBatches) -> TeacherTrainer:
    """The Trainer for ``config``: a constant learning rate, AdamW without weight decay or gradient
    clipping, one StepBatches item per micro-batch in order, checkpoints every ``checkpoint_every``."""
    device = next(peft_model.parameters()).device
    args = training_arguments(
        checkpoints, device, progress=progress,
        max_steps=config.max_steps,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.learning_rate,
        lr_scheduler_type="constant",
        optim="adamw_torch",
        weight_decay=0.0,
        max_grad_norm=0.0,
        logging_steps=min(10, config.max_steps),
        save_steps=config.checkpoint_every,
        seed=config.seed,
        train_sampling_strategy="sequential",
        bf16=False,
    )
    batches.length = config.max_steps * config.grad_accum * max(1, args.world_size)
    trainer = TeacherTrainer(model=peft_model, args=args, train_dataset=batches, data_collator=_one_item,
                             callbacks=[refresh], refresh=refresh, config=config, layer=layer, pad_id=pad_id)
    if not progress:
        silence_log_printing(trainer)
    return trainer


def _resumable_checkpoint(checkpoints: Path, fingerprint: str) -> str | None:
    """The last checkpoint under ``checkpoints`` if this build (same ``fingerprint``) wrote it whole."""
    last = latest_checkpoint(checkpoints)
    if last is None:
        return None
    state = Path(last) / STEP_STATE_FILE
    if not state.is_file() or not (Path(last) / FEATURE_STATE_FILE).is_file():
        return None
    return last if json.loads(state.read_text()).get("fingerprint") == fingerprint else None


def _remove_lora(peft_model) -> None:
    """Take the LoRA layers out again, leaving the caller's base model as it was."""
    try:
        peft_model.unload()
    except Exception:  # pragma: no cover - best effort; the base weights were never changed
        pass


# ----------------------------------------------------------------------------- CLI


def load_labelled(harmful: Sequence[str], harmless: Sequence[str]) -> tuple[list, list]:
    """Load prompt sets by name or path; return (harmful records, harmless records)."""
    harmful_records, harmless_records = [], []
    for name in harmful:
        harmful_records += [r for r in load_prompt_set(name) if r.label in ("harmful", None)]
    for name in harmless:
        harmless_records += [r for r in load_prompt_set(name) if r.label in ("benign", None)]
    return harmful_records, harmless_records


def default_records(test_fraction: float, seed: int, sets: Sequence[str] = DEFAULT_SETS) -> tuple[list, list, list]:
    """The built-in ``sets`` (the default build's, or ``TAXONOMY_SETS``), minus a held-out test split;
    return (harmful, harmless, test records)."""
    records = [r for name in sets for r in load_prompt_set(name)]
    if test_fraction > 0:
        build, test = split_records(records, [1.0 - test_fraction, test_fraction], seed=seed + 1000)
    else:
        build, test = records, []
    return [r for r in build if r.label == "harmful"], [r for r in build if r.label == "benign"], test
