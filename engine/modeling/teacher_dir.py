"""The teacher directory: what `refteacher teacher` writes and `filter` / `finetune` take.

Layout of a teacher directory::

    DIR/manifest.json        {"format": "refteacher.teacher/1", "model": spec, "model_hash": ...,
                              "layer": L, "position": -1, "threshold": x, "calibration": {...},
                              "adapter": "adapter" | null, ...any extra figures}
    DIR/feature.safetensors  {"feature": float32 [H]}: the refusal feature at layer L, and
                             {"category_directions": float32 [K, H]} when the manifest lists
                             K ``categories``: one direction per hazard category, which tells
                             why a row was flagged (the verdict stays the feature's)
    DIR/adapter/             the teacher's peft LoRA adapter (absent for an untrained teacher)

Nothing is loaded with pickle. ``manifest_sha256`` identifies a teacher in reports.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from refteacher.engine.errors import UserError
from refteacher.engine.modeling.forward import hidden_size, num_layers
from refteacher.engine.modeling.loading import load_model, load_tokenizer

FORMAT = "refteacher.teacher/1"
MANIFEST = "manifest.json"
FEATURE_FILE = "feature.safetensors"
ADAPTER_DIR = "adapter"


@dataclass
class Teacher:
    """A loaded teacher: frozen model (adapter merged), tokenizer, feature and threshold."""

    model: Any
    tokenizer: Any
    feature: torch.Tensor  # float32 [H], on the model's device
    layer: int
    threshold: float
    manifest: dict[str, Any]
    manifest_sha256: str
    path: Path
    position: int = -1
    extra: dict[str, Any] = field(default_factory=dict)
    categories: tuple[str, ...] = ()
    category_directions: torch.Tensor | None = None  # float32 [K, H], on the model's device

    def score_features(self) -> torch.Tensor:
        """The directions one fused cosine pass scores: the feature, then each category's; [1 + K, H]."""
        if self.category_directions is None:
            return self.feature[None]
        return torch.cat([self.feature[None], self.category_directions], dim=0)


def save_teacher_dir(
    out_dir: str | os.PathLike,
    *,
    model_spec: str,
    model_hash: str,
    feature: torch.Tensor,
    layer: int,
    threshold: float,
    calibration: dict[str, Any] | None = None,
    adapter_model: Any | None = None,
    extra: dict[str, Any] | None = None,
    categories: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a teacher directory atomically and return its path.

    ``feature`` is a [H] tensor (stored float32); ``adapter_model`` a peft model whose adapter is
    saved under ``adapter/`` (None for a teacher that is the bare model). ``extra`` is merged into
    the manifest (training figures, input hashes). ``categories`` maps hazard-category slugs to
    their [H] directions. An existing directory is replaced whole.
    """
    out = Path(out_dir)
    if feature.dim() != 1 or feature.numel() == 0:
        raise ValueError(f"feature must be a non-empty 1-D tensor, got shape {tuple(feature.shape)}")
    categories = categories or {}
    if any(d.shape != feature.shape for d in categories.values()):
        raise ValueError("every category direction must have the feature's shape")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tensors = {"feature": feature.detach().to("cpu", torch.float32).contiguous()}
        if categories:
            tensors["category_directions"] = torch.stack(
                [d.detach().to("cpu", torch.float32) for d in categories.values()]).contiguous()
        save_file(tensors, str(tmp / FEATURE_FILE))
        if adapter_model is not None:
            adapter_model.save_pretrained(str(tmp / ADAPTER_DIR))
        manifest = {
            "format": FORMAT,
            "model": str(model_spec),
            "model_hash": model_hash,
            "layer": int(layer),
            "position": -1,
            "hidden_size": int(feature.numel()),
            "threshold": float(threshold),
            "calibration": calibration or {},
            "adapter": ADAPTER_DIR if adapter_model is not None else None,
            "categories": list(categories),
            **(extra or {}),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_manifest(teacher_dir: str | os.PathLike) -> tuple[dict[str, Any], str]:
    """Return (manifest dict, sha256 of its bytes) of a teacher directory; UserError if invalid."""
    path = Path(teacher_dir)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise UserError(f"{path} is not a teacher directory (no {MANIFEST}); build one with `refteacher teacher`")
    raw = manifest_path.read_bytes()
    try:
        manifest = json.loads(raw)
    except json.JSONDecodeError as err:
        raise UserError(f"{manifest_path} is not valid JSON ({err}); rebuild the teacher") from None
    if manifest.get("format") != FORMAT:
        raise UserError(f"{manifest_path} has format {manifest.get('format')!r}, expected {FORMAT!r}")
    for key in ("model", "layer", "threshold"):
        if key not in manifest:
            raise UserError(f"{manifest_path} lacks {key!r}; rebuild the teacher")
    return manifest, hashlib.sha256(raw).hexdigest()


def load_teacher(
    teacher_dir: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    merge_adapter: bool = True,
) -> Teacher:
    """Load a teacher directory: model (+ adapter, merged unless ``merge_adapter=False``), frozen.

    Raises UserError when the directory is not a teacher, or its feature does not match the model.
    """
    path = Path(teacher_dir)
    manifest, digest = read_manifest(path)
    feature_path = path / FEATURE_FILE
    if not feature_path.is_file():
        raise UserError(f"{path} has no {FEATURE_FILE}; rebuild the teacher")
    tensors = load_file(str(feature_path))
    feature = tensors["feature"].to(torch.float32)
    categories = tuple(manifest.get("categories") or ())
    directions = tensors.get("category_directions")
    if categories and (directions is None or tuple(directions.shape) != (len(categories), feature.numel())):
        raise UserError(f"{path}: {FEATURE_FILE} lacks the directions of the manifest's {len(categories)} "
                        "categories; rebuild the teacher")
    spec = manifest["model"]
    model = load_model(spec, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(spec, trust_remote_code=trust_remote_code)
    if manifest.get("adapter"):
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(path / manifest["adapter"]))
        if merge_adapter:
            model = model.merge_and_unload()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    hidden = hidden_size(model)
    if feature.numel() != hidden:
        raise UserError(f"{path}: feature has {feature.numel()} dims but model {spec!r} has hidden size {hidden}")
    layer = int(manifest["layer"])
    if not 0 <= layer <= num_layers(model):
        raise UserError(f"{path}: layer {layer} is outside the model's 0..{num_layers(model)} layers")
    device_of_model = next(model.parameters()).device
    return Teacher(
        model=model,
        tokenizer=tokenizer,
        feature=feature.to(device_of_model),
        layer=layer,
        threshold=float(manifest["threshold"]),
        manifest=manifest,
        manifest_sha256=digest,
        path=path,
        position=int(manifest.get("position", -1)),
        categories=categories,
        category_directions=directions.to(device_of_model, torch.float32) if categories else None,
    )
