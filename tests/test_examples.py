"""Training-row encoding: labels sit exactly on the assistant's tokens."""
import pytest
from transformers import AutoTokenizer

from refteacher.engine.data.chat_examples import IGNORE_INDEX, encode_example, row_messages
from refteacher.engine.errors import UserError


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _labelled_text(tokenizer, ids, labels):
    return tokenizer.decode([t for t, l in zip(ids, labels) if l != IGNORE_INDEX])


def test_prompt_response_row_labels_only_the_response(tokenizer):
    ids, labels = encode_example(tokenizer, {"prompt": "What is 12+30?", "response": "42."})
    assert len(ids) == len(labels)
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 12+30?"}, {"role": "assistant", "content": "42."}],
        tokenize=False,
    )
    assert tokenizer.decode(ids) == full
    assert _labelled_text(tokenizer, ids, labels).startswith("42.")
    assert "What is" not in _labelled_text(tokenizer, ids, labels)


def test_every_assistant_turn_of_a_conversation_is_labelled(tokenizer):
    row = {"messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there"},
        {"role": "user", "content": "Count to three"},
        {"role": "assistant", "content": "one two three"},
    ]}
    ids, labels = encode_example(tokenizer, row)
    text = _labelled_text(tokenizer, ids, labels)
    assert "Hello there" in text and "one two three" in text
    assert "Count to three" not in text


def test_max_tokens_keeps_the_first_tokens(tokenizer):
    ids, labels = encode_example(tokenizer, {"prompt": "a b c", "response": "d e f"})
    short_ids, short_labels = encode_example(tokenizer, {"prompt": "a b c", "response": "d e f"}, max_tokens=5)
    assert short_ids == ids[:5] and short_labels == labels[:5]


@pytest.mark.parametrize("row, message", [
    ({"prompt": "no response"}, "a training row needs string 'prompt' and 'response' fields"),
    ({"messages": []}, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "user"}]}, "every message needs a 'role' and a string 'content'"),
    ({"messages": [{"role": "user", "content": "only a question"}]}, "needs at least one assistant turn"),
])
def test_malformed_rows_raise_user_errors(tokenizer, row, message):
    with pytest.raises(UserError, match=message):
        encode_example(tokenizer, row)


def test_row_messages_accepts_both_formats():
    assert row_messages({"prompt": "p", "response": "r"})[1] == {"role": "assistant", "content": "r"}
    assert row_messages({"messages": [{"role": "user", "content": "x"}]}) == [{"role": "user", "content": "x"}]


def test_pad_examples_right_pads_ids_labels_and_mask():
    from refteacher.engine.data.chat_examples import pad_examples

    batch = pad_examples([([5, 6, 7], [-100, 6, 7]), ([8], [8])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
