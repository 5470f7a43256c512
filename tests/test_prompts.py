"""Tests of engine/prompts.py: chat rendering, encoding with truncation, right padding."""
from __future__ import annotations

import pytest
import torch

from refteacher.engine.errors import UserError
from refteacher.engine.modeling.chat_prompts import encode_prompts, pad_token_id, render_prompt, right_pad
from refteacher.engine.modeling.loading import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def test_render_string_is_one_user_turn_with_generation_prompt(tokenizer):
    text = render_prompt(tokenizer, "How do I bake bread?")
    assert "<|im_start|>user\nHow do I bake bread?<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    same = render_prompt(tokenizer, [{"role": "user", "content": "How do I bake bread?"}])
    assert same == text


def test_render_keeps_given_messages(tokenizer):
    text = render_prompt(tokenizer, [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ])
    assert "Be terse." in text and "Hello." in text and text.endswith("<|im_start|>assistant\n")
    assert text.index("Hi") < text.index("Hello.") < text.index("Bye")


def test_bad_prompt_type_is_user_error(tokenizer):
    with pytest.raises(UserError, match="a prompt must be a string or a list of .* messages, got int"):
        render_prompt(tokenizer, 42)
    with pytest.raises(UserError, match="a prompt must be a string or a list of .* messages, got list"):
        render_prompt(tokenizer, [{"text": "no role"}])


def test_encode_matches_per_prompt_tokenisation(tokenizer):
    prompts = ["short", "a somewhat longer prompt about chemistry", [{"role": "user", "content": "chat"}]]
    ids, truncated = encode_prompts(tokenizer, prompts)
    assert truncated == [False, False, False]
    for seq, prompt in zip(ids, prompts):
        expected = tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
        assert seq == expected
    # the scored token is the last one of the generation prompt
    assert tokenizer.decode(ids[0][-3:]).endswith("assistant\n")


def test_encode_truncates_to_last_tokens(tokenizer):
    long_prompt = "word " * 200
    full, _ = encode_prompts(tokenizer, [long_prompt, "hi"])
    cut, truncated = encode_prompts(tokenizer, [long_prompt, "hi"], max_tokens=40)
    assert truncated == [True, len(full[1]) > 40]
    assert cut[0] == full[0][-40:]
    assert cut[1] == full[1][-40:]
    assert encode_prompts(tokenizer, []) == ([], [])
    with pytest.raises(UserError, match="max_tokens must be at least 1, got 0"):
        encode_prompts(tokenizer, ["x"], max_tokens=0)


def test_right_pad():
    input_ids, mask, last = right_pad([[5, 6, 7], [8], [9, 10]], pad_id=0)
    assert input_ids.dtype == mask.dtype == last.dtype == torch.long
    assert input_ids.tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert last.tolist() == [2, 0, 1]
    assert input_ids[torch.arange(3), last].tolist() == [7, 8, 10]
    with pytest.raises(ValueError, match="right_pad needs at least one sequence"):
        right_pad([], 0)
    with pytest.raises(ValueError, match="right_pad got an empty sequence"):
        right_pad([[1], []], 0)


@pytest.mark.parametrize("pad, eos, expected", [(3, 7, 3), (None, 7, 7), (0, 7, 0), (None, None, 0)])
def test_pad_token_id_falls_back_to_eos_then_zero(pad, eos, expected):
    class Tok:
        pad_token_id, eos_token_id = pad, eos

    assert pad_token_id(Tok()) == expected
