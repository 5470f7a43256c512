"""Batched greedy generation: left padding + KV cache give what one-at-a-time decoding gives."""
from __future__ import annotations

import pytest
import torch

from refteacher.engine.modeling.generation import generate, left_pad

PROMPTS = ["Hi", "Tell me a long story about a dragon and a knight", "What is 2+2?", "Name three colours please"]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from refteacher.engine.modeling.loading import load_model, load_tokenizer

    torch.set_num_threads(1)
    return load_model(str(tiny_model_dir), device="cpu"), load_tokenizer(str(tiny_model_dir))


def test_left_pad():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(ValueError, match="left_pad needs at least one non-empty sequence"):
        left_pad([[]], 0)


def test_batched_equals_single_and_reference(tiny):
    model, tokenizer = tiny
    batched = generate(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=4, progress=False)
    single = [generate(model, tokenizer, [p], max_new_tokens=6, batch_size=1, progress=False)[0] for p in PROMPTS]
    assert batched == single
    # reference: plain argmax decoding without a cache, one prompt at a time
    from refteacher.engine.modeling.chat_prompts import encode_prompts

    ids, _ = encode_prompts(tokenizer, PROMPTS[:2])
    for prompt_ids, answer in zip(ids, batched):
        seq = torch.tensor([prompt_ids])
        new = []
        with torch.no_grad():
            for _ in range(6):
                token = int(model(seq).logits[0, -1].argmax())
                if token in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")):
                    break
                new.append(token)
                seq = torch.cat([seq, torch.tensor([[token]])], dim=1)
        assert answer == tokenizer.decode(new, skip_special_tokens=True).strip()


def test_order_length_and_edge_cases(tiny):
    model, tokenizer = tiny
    out = generate(model, tokenizer, PROMPTS, max_new_tokens=3, batch_size=2, progress=False)
    assert len(out) == len(PROMPTS)
    assert all(len(tokenizer(a, add_special_tokens=False)["input_ids"]) <= 4 for a in out)
    reversed_out = generate(model, tokenizer, PROMPTS[::-1], max_new_tokens=3, batch_size=2, progress=False)
    assert reversed_out == out[::-1]
    assert generate(model, tokenizer, [], max_new_tokens=3) == []
    from refteacher.engine.errors import UserError

    with pytest.raises(UserError, match="max_new_tokens must be at least 1, got 0"):
        generate(model, tokenizer, PROMPTS, max_new_tokens=0)
