"""The teacher's training losses: the refusal feature's margin loss, the anchor, and response CE."""
from __future__ import annotations

from typing import Sequence

import torch

from refteacher.engine.data.chat_examples import IGNORE_INDEX, pad_examples
from refteacher.engine.modeling.forward import decoder_module, lm_head_of, num_layers
from refteacher.engine.modeling.prompt_states import PrefixCache
from refteacher.engine.modeling.token_losses import linear_cross_entropy, shifted_targets


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
