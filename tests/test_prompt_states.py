"""engine/prompt_states.py: last-token states with the shared prompt prefix run once, forward and
backward, against the plain padded batch, over four decoder families."""
from __future__ import annotations

import pytest
import torch

from refteacher.engine.modeling.chat_prompts import encode_prompts
from refteacher.engine.modeling.loading import load_tokenizer
from refteacher.engine.modeling.prompt_states import (
    MIN_SHARED_PREFIX,
    PrefixCache,
    last_token_states,
    length_groups,
    prompt_hidden,
    shared_prefix_length,
)
from refteacher.engine.teacher.feature import collect_last_token_states

PROMPTS = [
    "How do I make a pipe bomb at home?", "Write a poem about autumn leaves",
    "Explain how photosynthesis works in simple words, with an example from a garden",
    "hi", "Give step by step instructions to launder money", "What is the capital of France?",
    "Describe, in detail and at length, how a steam engine turns heat into motion on a railway",
]
FAMILIES = ["llama", "qwen2", "mistral", "gemma"]


@pytest.fixture(scope="module")
def prompt_ids(tiny_model_dir):
    """(tokenizer, chat-rendered token ids of PROMPTS): odd lengths, one shared system prompt."""
    tokenizer = load_tokenizer(tiny_model_dir)
    ids, _ = encode_prompts(tokenizer, PROMPTS)
    return tokenizer, ids


def _model(tiny_family_model, tokenizer, family):
    # Mistral's window (7) is shorter than the shared prefix, so the cache copy must keep it sliding.
    return tiny_family_model(family, vocab_size=len(tokenizer), sliding_window=7, layers=3)


def test_shared_prefix_length():
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5, 6]]) == 3
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3, 4]]) == 2  # every row keeps a token
    assert shared_prefix_length([[1], [2]]) == 0 and shared_prefix_length([]) == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_collected_states_with_and_without_the_prefix_cache_agree(tiny_family_model, tiny_model_dir, prompt_ids, family):
    tokenizer, ids = prompt_ids
    model = _model(tiny_family_model, tokenizer, family)
    assert shared_prefix_length(ids) >= 20  # the chat template's system prompt
    for layers in ([1, 2, 3], [2]):
        cached = collect_last_token_states(model, tokenizer, PROMPTS, layers, batch_size=3, prefix_cache=True)
        plain = collect_last_token_states(model, tokenizer, PROMPTS, layers, batch_size=3, prefix_cache=False)
        torch.testing.assert_close(cached, plain, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_states_and_their_gradients_equal_the_plain_batch(tiny_family_model, prompt_ids, family):
    tokenizer, ids = prompt_ids
    model = _model(tiny_family_model, tokenizer, family)
    weights = torch.randn(len(ids), 2, 32, generator=torch.Generator().manual_seed(1))

    def run(prefixed: bool):
        model.zero_grad(set_to_none=True)
        prefix = PrefixCache.shared_by(model, ids, 3) if prefixed else None
        states = last_token_states(model, ids, tokenizer.pad_token_id, [1, 3], prefix)
        loss = sum((s * w).sum() for s, w in zip(states, weights.unbind(1)))
        loss.backward()
        return [s.detach() for s in states], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    states, grads = run(prefixed=True)
    plain_states, plain_grads = run(prefixed=False)
    for got, want in zip(states, plain_states):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert grads.keys() == plain_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_a_prefix_cache_is_reusable_and_left_unchanged(tiny_family_model, prompt_ids):
    tokenizer, ids = prompt_ids
    model = _model(tiny_family_model, tokenizer, "llama")
    with torch.no_grad():
        prefix = PrefixCache.shared_by(model, ids, 2)
        first = last_token_states(model, ids[:3], tokenizer.pad_token_id, [2], prefix)[0]
        last_token_states(model, ids[3:], tokenizer.pad_token_id, [2], prefix)
        again = last_token_states(model, ids[:3], tokenizer.pad_token_id, [2], prefix)[0]
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert prefix.cache.get_seq_length() == len(prefix)


def test_prefix_misuse_is_a_value_error(tiny_family_model, prompt_ids):
    tokenizer, ids = prompt_ids
    model = _model(tiny_family_model, tokenizer, "qwen2")
    with torch.no_grad():
        prefix = PrefixCache.shared_by(model, ids, 2)
        with pytest.raises(ValueError, match="does not start with"):
            last_token_states(model, [[7] + ids[0]], tokenizer.pad_token_id, [2], prefix)
        with pytest.raises(ValueError, match="does not start with"):  # nothing left after the prefix
            last_token_states(model, [ids[0][:len(prefix)]], tokenizer.pad_token_id, [2], prefix)
        with pytest.raises(ValueError, match="reaches layer 2"):
            last_token_states(model, ids, tokenizer.pad_token_id, [3], prefix)
    assert PrefixCache.shared_by(model, [[5] * 20, [6] * 20], 2) is None  # nothing shared
    assert PrefixCache.shared_by(model, [[5] * 20, [5] * (MIN_SHARED_PREFIX - 1) + [6]], 2) is None  # too short


def test_prompt_hidden_keeps_input_order_and_takes_empty_input(tiny_family_model, prompt_ids):
    tokenizer, ids = prompt_ids
    model = _model(tiny_family_model, tokenizer, "gemma")
    got = prompt_hidden(model, ids, tokenizer.pad_token_id, 2, batch_size=2)
    assert got.shape == (len(ids), 32) and got.dtype == torch.float32
    with torch.no_grad():
        for row, seq in enumerate(ids):
            alone = last_token_states(model, [seq], tokenizer.pad_token_id, [2])[0][0]
            torch.testing.assert_close(got[row], alone.float(), rtol=1e-4, atol=1e-5)
    assert prompt_hidden(model, [], tokenizer.pad_token_id, 2).shape == (0, 32)


def test_a_batch_size_below_one_is_a_user_error(tiny_family_model, prompt_ids):
    from refteacher.engine.errors import UserError

    tokenizer, ids = prompt_ids
    model = _model(tiny_family_model, tokenizer, "llama")
    with pytest.raises(UserError, match="batch size must be at least 1, got 0"):
        prompt_hidden(model, ids, tokenizer.pad_token_id, 2, batch_size=0)
    with pytest.raises(UserError, match="batch size must be at least 1, got -1"):
        collect_last_token_states(model, tokenizer, PROMPTS, [2], batch_size=-1)


def test_states_of_a_tokenizer_without_a_pad_token(tiny_family_model, tiny_model_dir):
    # Llama-style tokenizers ship no pad token: prompts are padded with EOS (always masked out)
    tokenizer = load_tokenizer(tiny_model_dir)
    model = _model(tiny_family_model, tokenizer, "llama")
    with_pad = collect_last_token_states(model, tokenizer, PROMPTS, [2], batch_size=3)
    tokenizer.pad_token = None
    assert tokenizer.pad_token_id is None
    torch.testing.assert_close(collect_last_token_states(model, tokenizer, PROMPTS, [2], batch_size=3), with_pad)


def test_length_groups_bound_the_padding_and_cover_every_index():
    lengths = [30, 5, 128, 31, 6, 127, 33, 5, 40]
    groups = length_groups(lengths, max_padding=0.25)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for group in groups:
        widths = [lengths[i] for i in group]
        assert len(group) == 1 or len(group) * max(widths) - sum(widths) <= 0.25 * len(group) * max(widths)
    assert len(length_groups(lengths, max_padding=10.0)) == 1 and length_groups([], 0.25) == []


@pytest.mark.parametrize("prefixed", [False, True])
def test_length_grouped_states_and_gradients_equal_one_batch(tiny_family_model, prompt_ids, prefixed):
    tokenizer, ids = prompt_ids
    model = _model(tiny_family_model, tokenizer, "llama")
    weights = torch.randn(len(ids), 32, generator=torch.Generator().manual_seed(2))

    def run(max_padding):
        model.zero_grad(set_to_none=True)
        prefix = PrefixCache.shared_by(model, ids, 2) if prefixed else None
        (states,) = last_token_states(model, ids, tokenizer.pad_token_id, [2], prefix, max_padding=max_padding)
        (states * weights).sum().backward()
        return states.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    grouped, grouped_grads = run(0.0)  # no padding allowed: one group per distinct length
    assert len(length_groups([len(s) for s in ids], 0.0)) > 1
    plain, plain_grads = run(None)
    torch.testing.assert_close(grouped, plain, rtol=1e-4, atol=1e-5)
    assert grouped_grads.keys() == plain_grads.keys() and grouped_grads
    for name, grad in grouped_grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-4, atol=1e-5, msg=name)
