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
target recall), and the result is written with ``save_teacher_dir``. Training checkpoints every
``checkpoint_every`` steps (safetensors + JSON, no pickle) and resumes from the last one, giving
the same result as an uninterrupted run.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import time
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import torch

from refteacher.engine.errors import UserError
from refteacher.engine.examples import IGNORE_INDEX, pad_examples

CHECKPOINT_DIR = ".teacher-checkpoint"
DEFAULT_SETS = ("advbench", "harmbench", "matched_pairs", "edgy_benign")
DEFAULT_TARGET_FPR = 0.05


@dataclass
class TeacherConfig:
    """Every knob of a teacher build; all of it is written to the manifest."""

    layer: int | None = None          # feature layer; None: two thirds of the depth (20 of 30)
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    learning_rate: float = 1e-3
    max_steps: int = 60
    feature_batch: int = 32           # prompts per step for the feature loss (half harmful)
    ce_batch: int = 8                 # examples per step for the CE loss (half refusals)
    feature_weight: float = 1.0       # lambda
    anchor_weight: float = 0.0        # weight of anchor_loss (feature-layer states kept near the untouched model's)
    margin: float = 0.0               # harmless prompts are pushed to cos <= margin
    harmful_target: float = 0.5       # harmful prompts are pushed to cos >= harmful_target (a hinge)
    refresh_every: int = 10           # steps between re-estimates of the feature
    reference_size: int = 64          # prompts per class for each re-estimate
    max_prompt_tokens: int = 128
    answer_tokens: int = 32           # max new tokens of the cached helpful answers
    calib_fraction: float = 0.25
    rephrase_per_prompt: int = 3
    calib_rephrase: int = 5           # rephrasings of each harmful calibration prompt (5: one per form)
    template_harmless: int = 400
    ce_harmless: int = 96
    target_recall: float | None = None  # set: threshold for this recall (overrides target_fpr)
    target_fpr: float | None = DEFAULT_TARGET_FPR
    threshold_gap: float = 0.0        # the threshold is at least margin + threshold_gap, unanchored (see train_teacher)
    checkpoint_every: int = 20
    seed: int = 0                     # LoRA init, batches, reference sample, refusal wording (and the data, below)
    data_seed: int | None = None      # calibration split, template prompts, rephrasings, CE prompts; None: seed
    threads: int | None = None

    def override(self, key: str, text: str) -> None:
        """Set field ``key`` from command-line text, parsed by the field's declared type.

        ``int | None`` fields take an int or ``none``, ``tuple[str, ...]`` fields a comma-separated
        list. Raises UserError for an unknown field or text that does not parse.
        """
        hints = typing.get_type_hints(type(self))
        if key not in hints:
            raise UserError(f"TeacherConfig has no field {key!r}; fields: {', '.join(hints)}")
        kind = hints[key]
        if typing.get_origin(kind) in (typing.Union, types.UnionType):  # ``X | None``
            if text.strip().lower() == "none":
                setattr(self, key, None)
                return
            kind = next(t for t in typing.get_args(kind) if t is not type(None))
        try:
            if typing.get_origin(kind) is tuple:
                value = tuple(part.strip() for part in text.split(",") if part.strip())
            else:
                value = kind(text)
        except ValueError:
            raise UserError(f"{key}: {text!r} is not a valid {getattr(kind, '__name__', kind)}") from None
        setattr(self, key, value)

    @property
    def build_data_seed(self) -> int:
        """The seed that picks the build data: ``data_seed``, or ``seed`` when that is None."""
        return self.seed if self.data_seed is None else self.data_seed

    def manifest(self) -> dict[str, Any]:
        """Return the config as a JSON-ready dict."""
        out = asdict(self)
        out["lora_targets"] = list(self.lora_targets)
        return out

    @classmethod
    def from_manifest(cls, values: dict[str, Any]) -> "TeacherConfig":
        """Rebuild the config a teacher was built with from its ``manifest()`` dict.

        Fields the dict lacks (a manifest older than the field) keep their defaults; keys this
        version does not know are ignored.
        """
        known = {f.name for f in fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in known})


@dataclass
class TeacherResult:
    """What ``train_teacher`` returns: the output folder and every figure written to the manifest."""

    path: Path
    layer: int
    threshold: float
    calibration: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


# ----------------------------------------------------------------------------- batches


def _encode(tokenizer, prompts: Sequence[str], max_tokens: int) -> list[list[int]]:
    from refteacher.engine.prompts import encode_prompts

    return encode_prompts(tokenizer, list(prompts), max_tokens=max_tokens)[0]


def difference_of_means(harmful: torch.Tensor, harmless: torch.Tensor) -> torch.Tensor:
    """Return mean(harmful) - mean(harmless) [H] float32 from [N, H] and [M, H] hidden states."""
    return (harmful.double().mean(0) - harmless.double().mean(0)).float()


def feature_loss(scores: torch.Tensor, labels: torch.Tensor, margin: float,
                 harmful_target: float = 1.0) -> torch.Tensor:
    """Feature-similarity loss from cosine ``scores`` [B] and 0/1 ``labels`` [B].

    Harmful rows contribute ``relu(harmful_target - s)`` (``1 - s`` at the default target 1),
    harmless rows ``relu(s - margin)``; each class is averaged on its own and the two averages are
    added (a class absent from the batch adds 0).
    """
    harmful = labels.bool()
    loss = scores.new_zeros(())
    if harmful.any():
        loss = loss + torch.relu(harmful_target - scores[harmful]).mean()
    if (~harmful).any():
        loss = loss + torch.relu(scores[~harmful] - margin).mean()
    return loss


def anchor_loss(hidden: torch.Tensor, untouched: torch.Tensor) -> torch.Tensor:
    """Mean relative squared distance ``|h - h0|^2 / |h0|^2`` between rows of ``hidden`` [B, H] (the
    teacher's feature-layer states, with grad) and ``untouched`` [B, H] (the same prompts through the
    model without LoRA). Returns a scalar float32; 0 for an empty batch.

    The feature loss alone reshapes the feature layer freely to separate the training sets, and
    learns their style. This term holds the teacher near the untouched geometry, which separates
    some unseen sources better (left-out HarmBench) and others worse (same-style matched pairs).
    """
    if hidden.numel() == 0:
        return hidden.new_zeros((), dtype=torch.float32)
    h, h0 = hidden.float(), untouched.float()
    return ((h - h0).pow(2).sum(-1) / h0.pow(2).sum(-1).clamp_min(1e-12)).mean()


def response_ce(model, examples: Sequence[tuple[list[int], list[int]]], pad_id: int) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled (assistant) tokens of ``examples``.

    ``examples`` are (input_ids, labels) pairs (labels -100 off the assistant turn), right-padded
    into one batch. Returns a float32 scalar. The unlabelled token prefix all examples share (the
    chat template's system prompt) runs once (``prompt_states.PrefixCache``), and the LM head is
    applied only at labelled positions (``losses.linear_cross_entropy``), so no [tokens x vocab]
    tensor for the prompt is built.
    """
    from refteacher.engine.attention import lm_head_of
    from refteacher.engine.losses import linear_cross_entropy, shifted_targets
    from refteacher.engine.models import decoder_module, num_layers
    from refteacher.engine.prompt_states import PrefixCache

    device = next(model.parameters()).device
    first_labelled = min(next((t for t, lab in enumerate(labels) if lab != IGNORE_INDEX), len(labels))
                         for _, labels in examples)
    # The position before the first labelled token predicts it, so it must stay out of the prefix:
    # a prefix shared by ids[:first_labelled] always leaves that last token out.
    prefix = PrefixCache.shared_by(model, [ids[:first_labelled] for ids, _ in examples], num_layers(model))
    skip = len(prefix) if prefix is not None else 0
    batch = pad_examples([(ids[skip:], labels[skip:]) for ids, labels in examples], pad_id)
    input_ids, labels, mask = (batch[k].to(device) for k in ("input_ids", "labels", "attention_mask"))
    kwargs: dict = {"use_cache": False}
    if prefix is not None:
        mask, kwargs = prefix.continue_with(mask)
    hidden = decoder_module(model)(input_ids=input_ids, attention_mask=mask, **kwargs).last_hidden_state
    labelled, targets = shifted_targets(labels)
    weight, bias = lm_head_of(model)
    return linear_cross_entropy(hidden[labelled], weight, targets, bias=bias)


# ----------------------------------------------------------------------------- checkpoints


def _trainable(model) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(folder: Path, model, optimizer, feature: torch.Tensor, step: int,
                    history: list[dict[str, float]], fingerprint: str) -> None:
    """Write LoRA weights, AdamW moments, the feature and the step to ``folder`` atomically."""
    from safetensors.torch import save_file

    params = _trainable(model)
    index = {id(p): name for name, p in params.items()}
    tensors = {f"param/{n}": p.detach().cpu().contiguous() for n, p in params.items()}
    steps = {}
    for p, state in optimizer.state.items():
        name = index[id(p)]
        tensors[f"exp_avg/{name}"] = state["exp_avg"].detach().cpu().contiguous()
        tensors[f"exp_avg_sq/{name}"] = state["exp_avg_sq"].detach().cpu().contiguous()
        steps[name] = float(state["step"])
    tensors["feature"] = feature.detach().cpu().float().contiguous()
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "state.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": step, "adam_steps": steps, "history": history,
                                                "fingerprint": fingerprint}))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def load_checkpoint(folder: Path, model, optimizer, fingerprint: str) -> tuple[int, torch.Tensor, list] | None:
    """Restore a checkpoint written by ``save_checkpoint``; return (step, feature, history) or None.

    A checkpoint of a different build (other data, config or model) is ignored, not loaded.
    """
    from safetensors.torch import load_file

    meta_path, state_path = folder / "state.json", folder / "state.safetensors"
    if not meta_path.is_file() or not state_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("fingerprint") != fingerprint:
        return None
    tensors = load_file(str(state_path))
    params = _trainable(model)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[f"param/{name}"])
    for name, p in params.items():
        if f"exp_avg/{name}" in tensors:
            optimizer.state[p] = {
                "step": torch.tensor(meta["adam_steps"][name]),
                "exp_avg": tensors[f"exp_avg/{name}"].to(p.device),
                "exp_avg_sq": tensors[f"exp_avg_sq/{name}"].to(p.device),
            }
    device = next(model.parameters()).device
    return int(meta["step"]), tensors["feature"].to(device), list(meta.get("history", []))


# ----------------------------------------------------------------------------- calibration


def calibrate(harmful_scores, harmless_scores, *, target_recall: float | None = None,
              target_fpr: float | None = None, floor: float | None = None) -> tuple[float, dict[str, Any]]:
    """Choose the flagging threshold from calibration scores; return (threshold, figures).

    With ``target_recall``: the highest threshold with recall >= ``target_recall`` on the harmful
    scores. Otherwise: the lowest threshold with false-positive rate <= ``target_fpr`` (default
    ``DEFAULT_TARGET_FPR``) on the harmless ones -- the default, because harmful calibration
    prompts share the training sets' sources and score higher than unseen harmful prompts, while
    the harmless side of the threshold carries over (see benchmarks/eval_teacher.py). ``floor``,
    when given, is the lowest threshold allowed (the rule's choice is raised to it). Figures:
    rule, target, floor, AUROC, recall, FPR, precision and counts at the threshold.
    """
    from refteacher.engine.metrics import auroc, precision_recall_fpr, threshold_for_fpr, threshold_for_recall

    harmful = torch.as_tensor(harmful_scores, dtype=torch.float64).reshape(-1)
    harmless = torch.as_tensor(harmless_scores, dtype=torch.float64).reshape(-1)
    if harmful.numel() == 0 or harmless.numel() == 0:
        raise UserError("calibration needs harmful and harmless prompts; give more data or a larger --calib-fraction")
    scores = torch.cat([harmful, harmless])
    labels = torch.cat([torch.ones_like(harmful), torch.zeros_like(harmless)]).bool()
    if target_recall is not None:
        threshold = threshold_for_recall(scores, labels, target_recall)
        rule = {"rule": "recall", "target_recall": target_recall}
    else:
        target_fpr = DEFAULT_TARGET_FPR if target_fpr is None else target_fpr
        threshold = threshold_for_fpr(scores, labels, target_fpr)
        rule = {"rule": "fpr", "target_fpr": target_fpr}
    if floor is not None:
        rule["floor"] = float(floor)
        threshold = max(float(threshold), float(floor))
    precision, recall, fpr = precision_recall_fpr(scores, labels, threshold)
    figures = {**rule, "threshold": threshold, "auroc": auroc(scores, labels), "recall": recall, "fpr": fpr,
               "precision": precision, "harmful": int(harmful.numel()), "harmless": int(harmless.numel())}
    return float(threshold), figures


# ----------------------------------------------------------------------------- training


def _default_layer(total_layers: int) -> int:
    """The default feature layer: two thirds of the depth (20 of SmolLM2's 30), at least 1.

    Left-out HarmBench AUROC was 0.72 at layer 12, 0.95 at 16 and 0.98 at 20 (README, "Feature layer").
    """
    return max(1, round(2 * total_layers / 3))


def _fingerprint(config: TeacherConfig, data, model_hash: str) -> str:
    import hashlib

    payload = json.dumps([config.manifest(), model_hash, data.train_harmful, data.train_harmless,
                          data.ce_harmless], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def teacher_data_for(config: TeacherConfig, harmful_records: Sequence, harmless_records: Sequence):
    """The TeacherData (training, CE and calibration prompt lists) a build with ``config`` uses
    on these labelled PromptRecords; deterministic, so a built teacher's split can be rebuilt."""
    from refteacher.engine.teacher_data import build_teacher_data

    return build_teacher_data(
        harmful_records, harmless_records, calib_fraction=config.calib_fraction,
        rephrase_per_prompt=config.rephrase_per_prompt, template_harmless=config.template_harmless,
        ce_harmless=config.ce_harmless, calib_rephrase=config.calib_rephrase, seed=config.build_data_seed,
    )


def _reference_sample(prompt_ids: list[list[int]], size: int, seed: int, tag: str) -> list[list[int]]:
    rng = random.Random(f"reference-{tag}-{seed}")
    chosen = rng.sample(range(len(prompt_ids)), min(size, len(prompt_ids)))
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
    from peft import LoraConfig, get_peft_model

    from refteacher.engine.datasets import prompt_set_hash
    from refteacher.engine.examples import encode_example
    from refteacher.engine.models import load_model, load_tokenizer, model_fingerprint, num_layers
    from refteacher.engine.prompt_states import PrefixCache, last_token_states, prompt_hidden
    from refteacher.engine.prompts import pad_token_id
    from refteacher.engine.refusals import refusal_for
    from refteacher.engine.teacher_data import cached_answers
    from refteacher.engine.teacher_dir import save_teacher_dir
    from refteacher.kernels.cosine import refusal_scores
    from tqdm.auto import tqdm

    config = config or TeacherConfig()
    if config.threads:
        torch.set_num_threads(config.threads)
    if config.max_steps < 0:
        raise UserError(f"--max-steps must be >= 0, got {config.max_steps}")
    if config.anchor_weight < 0:
        raise UserError(f"--anchor-weight must be >= 0, got {config.anchor_weight}")
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
    params = list(_trainable(peft_model).values())
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)

    ref_harmful = _reference_sample(harmful_ids, config.reference_size, config.seed, "harmful")
    ref_harmless = _reference_sample(harmless_ids, config.reference_size, config.seed, "harmless")

    def batch_states(ids: list[list[int]]) -> torch.Tensor:
        """States [B, H] of one batch after ``layer``; grads flow (through the shared prefix too)."""
        return last_token_states(peft_model, ids, pad_id, [layer], PrefixCache.shared_by(peft_model, ids, layer))[0]

    def estimate_feature() -> torch.Tensor:
        was = peft_model.training
        peft_model.eval()
        h = prompt_hidden(peft_model, ref_harmful, pad_id, layer)
        b = prompt_hidden(peft_model, ref_harmless, pad_id, layer)
        peft_model.train(was)
        return difference_of_means(h, b)

    fingerprint = _fingerprint(config, data, model_hash)
    checkpoint = out.parent / f"{out.name}{CHECKPOINT_DIR}"
    start_step, history = 0, []
    restored = load_checkpoint(checkpoint, peft_model, optimizer, fingerprint)
    if restored is not None:
        start_step, feature, history = restored
    else:
        feature = estimate_feature()

    device = next(peft_model.parameters()).device
    half_f, half_c = max(1, config.feature_batch // 2), max(1, config.ce_batch // 2)
    bar = tqdm(total=config.max_steps, initial=start_step, desc="teacher", unit="step", disable=not progress)
    step = start_step
    for step in range(start_step, config.max_steps):
        if step > 0 and step % config.refresh_every == 0:  # same on a resumed run: weights are restored
            feature = estimate_feature()
        rng = random.Random(f"teacher-step-{config.seed}-{step}")
        hb = rng.sample(range(len(harmful_ids)), min(half_f, len(harmful_ids)))
        bb = rng.sample(range(len(harmless_ids)), min(half_f, len(harmless_ids)))
        batch_ids = [harmful_ids[i] for i in hb] + [harmless_ids[i] for i in bb]
        hidden = batch_states(batch_ids)
        scores = refusal_scores(hidden.float(), feature.to(device))
        labels = torch.tensor([1] * len(hb) + [0] * len(bb), device=device)
        l_feat = feature_loss(scores, labels, config.margin, config.harmful_target)
        loss = config.feature_weight * l_feat
        l_anchor = torch.zeros(())
        if config.anchor_weight > 0:
            with torch.no_grad(), peft_model.disable_adapter():
                untouched = batch_states(batch_ids)
            l_anchor = anchor_loss(hidden, untouched)
            loss = loss + config.anchor_weight * l_anchor
        l_ce = torch.zeros(())
        if config.ce_batch > 0 and (ce_refusals or ce_answers):
            chosen = [ce_refusals[i] for i in rng.sample(range(len(ce_refusals)), min(half_c, len(ce_refusals)))]
            chosen += [ce_answers[i] for i in rng.sample(range(len(ce_answers)), min(half_c, len(ce_answers)))]
            l_ce = response_ce(peft_model, chosen, pad_id)
            loss = loss + l_ce
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append({"step": step + 1, "loss": float(loss.detach()), "feature_loss": float(l_feat.detach()),
                        "ce_loss": float(l_ce.detach()), "anchor_loss": float(l_anchor.detach())})
        bar.set_postfix(loss=f"{history[-1]['loss']:.3f}", feat=f"{history[-1]['feature_loss']:.3f}")
        bar.update(1)
        done = step + 1
        if on_step is not None:
            on_step(done, peft_model, estimate_feature)
        if done % config.checkpoint_every == 0 or done == config.max_steps:
            save_checkpoint(checkpoint, peft_model, optimizer, feature, done, history, fingerprint)
        if stop_after is not None and done >= stop_after and done < config.max_steps:
            bar.close()
            save_checkpoint(checkpoint, peft_model, optimizer, feature, done, history, fingerprint)
            _remove_lora(peft_model)
            return TeacherResult(path=checkpoint, layer=layer, threshold=float("nan"), calibration={}, history=history)
    bar.close()

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
        "teacher": {"config": config.manifest(), "steps": config.max_steps, "history": history,
                    "build_seconds": round(seconds, 1), "torch_threads": torch.get_num_threads(),
                    "counts": data.counts},
        "inputs": {"harmful_sha256": prompt_set_hash(list(harmful_records)),
                   "harmless_sha256": prompt_set_hash(list(harmless_records)),
                   "harmful_sources": sorted({r.source for r in harmful_records}),
                   "harmless_sources": sorted({r.source for r in harmless_records})},
    }
    path = save_teacher_dir(out, model_spec=str(model_spec), model_hash=model_hash, feature=feature, layer=layer,
                            threshold=threshold, calibration=calibration, adapter_model=peft_model, extra=extra)
    shutil.rmtree(checkpoint, ignore_errors=True)
    _remove_lora(peft_model)
    return TeacherResult(path=path, layer=layer, threshold=threshold, calibration=calibration, history=history,
                         seconds=seconds)


def _remove_lora(peft_model) -> None:
    """Take the LoRA layers out again, leaving the caller's base model as it was."""
    try:
        peft_model.unload()
    except Exception:  # pragma: no cover - best effort; the base weights were never changed
        pass


# ----------------------------------------------------------------------------- CLI


def load_labelled(harmful: Sequence[str], harmless: Sequence[str]) -> tuple[list, list]:
    """Load prompt sets by name or path; return (harmful records, harmless records)."""
    from refteacher.engine.datasets import load_prompt_set

    harmful_records, harmless_records = [], []
    for name in harmful:
        harmful_records += [r for r in load_prompt_set(name) if r.label in ("harmful", None)]
    for name in harmless:
        harmless_records += [r for r in load_prompt_set(name) if r.label in ("benign", None)]
    return harmful_records, harmless_records


def default_records(test_fraction: float, seed: int) -> tuple[list, list, list]:
    """The built-in sets, minus a held-out test split; return (harmful, harmless, test records)."""
    from refteacher.engine.datasets import load_prompt_set, split_records

    records = [r for name in DEFAULT_SETS for r in load_prompt_set(name)]
    if test_fraction > 0:
        build, test = split_records(records, [1.0 - test_fraction, test_fraction], seed=seed + 1000)
    else:
        build, test = records, []
    return [r for r in build if r.label == "harmful"], [r for r in build if r.label == "benign"], test


def config_from_args(args: argparse.Namespace) -> TeacherConfig:
    """Return the TeacherConfig that ``refteacher teacher``'s parsed arguments ask for.

    Raises UserError for a threshold target out of range.
    """
    if not 0.0 <= args.target_fpr < 1.0:
        raise UserError(f"--target-fpr must be in [0, 1), got {args.target_fpr}")
    if args.target_recall is not None and not 0.0 < args.target_recall <= 1.0:
        raise UserError(f"--target-recall must be in (0, 1], got {args.target_recall}")
    return TeacherConfig(
        layer=args.layer, lora_rank=args.lora_rank, learning_rate=args.lr, max_steps=args.max_steps,
        feature_weight=args.feature_weight, anchor_weight=args.anchor_weight, margin=args.margin,
        harmful_target=args.harmful_target,
        threshold_gap=args.threshold_gap, refresh_every=args.refresh_every,
        calib_fraction=args.calib_fraction, rephrase_per_prompt=args.rephrase, calib_rephrase=args.calib_rephrase,
        template_harmless=args.template_harmless,
        target_recall=args.target_recall,
        target_fpr=None if args.target_recall is not None else args.target_fpr,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed, data_seed=args.data_seed, threads=args.threads,
    )


def _run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if args.harmful or args.harmless:
        if not (args.harmful and args.harmless):
            raise UserError("give both --harmful and --harmless prompt sets (or neither, for the built-in sets)")
        harmful, harmless = load_labelled(args.harmful, args.harmless)
        test = []
    else:
        harmful, harmless, test = default_records(args.test_fraction, config.build_data_seed)
    result = train_teacher(args.model, harmful, harmless, args.out, config, progress=not args.quiet)
    summary = {"teacher": str(result.path), "layer": result.layer, "threshold": result.threshold,
               "calibration": result.calibration, "build_seconds": round(result.seconds, 1)}
    if test:
        summary["held_out_test_prompts"] = len(test)
    print(json.dumps(summary, indent=2))
    return 0


def add_cli(subparsers) -> None:
    """Register ``refteacher teacher``."""
    from refteacher.engine.models import DEFAULT_MODEL

    C = TeacherConfig  # every default below is the config's
    p = subparsers.add_parser(
        "teacher", help="train a ReFT teacher (LoRA: refusal SFT + feature loss) and calibrate its threshold",
        description=(
            "Turn an instruction-tuned model into a ReFT teacher: LoRA trained with CE on refusals/own answers "
            "plus the refusal-feature loss, with rephrased prompts for generalisation; then calibrate the "
            "flagging threshold on a held-out split. With no --harmful/--harmless the built-in sets are used "
            "(minus a --test-fraction held out for evaluation). Resumes from its last checkpoint."
        ),
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model directory, hub id or alias (default {DEFAULT_MODEL})")
    p.add_argument("--out", required=True, help="teacher directory to write")
    p.add_argument("--harmful", nargs="+", default=[], help="harmful prompt sets (names or files)")
    p.add_argument("--harmless", nargs="+", default=[], help="harmless prompt sets (names or files)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="built-in data held out from building")
    p.add_argument("--layer", type=int, default=None, help="feature layer N; LoRA goes on decoder layers 1..N, the ones that compute it (default: two thirds of the depth, 20 of 30 for SmolLM2)")
    p.add_argument("--lora-rank", type=int, default=C.lora_rank, help="LoRA rank")
    p.add_argument("--lr", type=float, default=C.learning_rate, help="learning rate")
    p.add_argument("--max-steps", type=int, default=C.max_steps, help="training steps")
    p.add_argument("--feature-weight", type=float, default=C.feature_weight,
                   help="lambda, weight of the feature loss beside the CE")
    p.add_argument("--anchor-weight", type=float, default=C.anchor_weight,
                   help="weight of a term holding feature-layer states near the untouched model's: it helps on unseen "
                        "sources the untouched model already separates, and hurts on same-style harmful/harmless pairs "
                        f"(default {C.anchor_weight}: off)")
    p.add_argument("--margin", type=float, default=C.margin,
                   help="harmless prompts are pushed below this cosine")
    p.add_argument("--threshold-gap", type=float, default=C.threshold_gap,
                   help="the threshold is never below --margin plus this, whatever the rule picks "
                        f"(default {C.threshold_gap}; "
                        "not applied with --anchor-weight, whose harmless scores sit well below the margin)")
    p.add_argument("--harmful-target", type=float, default=C.harmful_target,
                   help="harmful prompts are pushed above this cosine (a hinge; 1.0 pushes them all the way, "
                        f"which fits the training sets' style and generalises worse; default {C.harmful_target})")
    p.add_argument("--refresh-every", type=int, default=C.refresh_every,
                   help="steps between re-estimates of the refusal feature from the teacher")
    p.add_argument("--calib-fraction", type=float, default=C.calib_fraction,
                   help="share of each set kept out of training to calibrate the threshold")
    p.add_argument("--rephrase", type=int, default=C.rephrase_per_prompt,
                   help="rephrasings per training prompt")
    p.add_argument("--calib-rephrase", type=int, default=C.calib_rephrase,
                   help="rephrasings per harmful calibration prompt, so the threshold holds across styles")
    p.add_argument("--template-harmless", type=int, default=C.template_harmless,
                   help="template-written harmless prompts added")
    rule = p.add_mutually_exclusive_group()
    rule.add_argument("--target-fpr", type=float, default=DEFAULT_TARGET_FPR,
                      help=f"threshold: the lowest with this false-positive rate on the harmless calibration prompts "
                           f"(default {DEFAULT_TARGET_FPR}; it carries over to unseen prompts better than a recall target)")
    rule.add_argument("--target-recall", type=float, default=None,
                      help="threshold: the highest keeping this recall on the harmful calibration prompts instead")
    p.add_argument("--checkpoint-every", type=int, default=C.checkpoint_every,
                   help="steps between checkpoints; a rerun resumes from the last")
    p.add_argument("--seed", type=int, default=C.seed,
                   help="seed of the LoRA init and the batches, and of the data unless --data-seed is given")
    p.add_argument("--data-seed", type=int, default=None,
                   help="seed of the build data alone: the test and calibration splits, template prompts, rephrasings "
                        "and CE prompts (default: --seed). Two builds differing only in --seed see the same prompts")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run)
