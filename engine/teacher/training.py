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

import hashlib
import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Sequence

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from refteacher.engine.data.chat_examples import encode_example
from refteacher.engine.data.prompt_sets import load_prompt_set, prompt_set_hash, split_records
from refteacher.engine.errors import UserError
from refteacher.engine.modeling.chat_prompts import encode_prompts, pad_token_id
from refteacher.engine.modeling.forward import num_layers
from refteacher.engine.modeling.loading import load_model, load_tokenizer, model_fingerprint
from refteacher.engine.modeling.prompt_states import PrefixCache, last_token_states, prompt_hidden
from refteacher.engine.modeling.teacher_dir import save_teacher_dir
from refteacher.engine.teacher.calibration import calibrate
from refteacher.engine.teacher.config import DEFAULT_SETS, TeacherConfig, TeacherResult
from refteacher.engine.teacher.feature import difference_of_means
from refteacher.engine.teacher.objective import anchor_loss, feature_loss, response_ce
from refteacher.engine.teacher.refusals import refusal_for
from refteacher.engine.teacher.training_data import build_teacher_data, cached_answers
from refteacher.kernels.cosine import refusal_scores

CHECKPOINT_DIR = ".teacher-checkpoint"


# ----------------------------------------------------------------------------- batches


def _encode(tokenizer, prompts: Sequence[str], max_tokens: int) -> list[list[int]]:
    return encode_prompts(tokenizer, list(prompts), max_tokens=max_tokens)[0]


# ----------------------------------------------------------------------------- checkpoints


def _trainable(model) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(folder: Path, model, optimizer, feature: torch.Tensor, step: int,
                    history: list[dict[str, float]], fingerprint: str) -> None:
    """Write LoRA weights, AdamW moments, the feature and the step to ``folder`` atomically."""
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
    harmful_records, harmless_records = [], []
    for name in harmful:
        harmful_records += [r for r in load_prompt_set(name) if r.label in ("harmful", None)]
    for name in harmless:
        harmless_records += [r for r in load_prompt_set(name) if r.label in ("benign", None)]
    return harmful_records, harmless_records


def default_records(test_fraction: float, seed: int) -> tuple[list, list, list]:
    """The built-in sets, minus a held-out test split; return (harmful, harmless, test records)."""
    records = [r for name in DEFAULT_SETS for r in load_prompt_set(name)]
    if test_fraction > 0:
        build, test = split_records(records, [1.0 - test_fraction, test_fraction], seed=seed + 1000)
    else:
        build, test = records, []
    return [r for r in build if r.label == "harmful"], [r for r in build if r.label == "benign"], test
