"""The refusal feature: a difference of means between harmful and harmless prompts' hidden states.

For every layer it streams the last-prompt-token hidden states of the harmful and harmless sets
(decoder run only up to the deepest layer needed), accumulates their means in float64, and scores
held-out prompts by cosine similarity with the unit difference-of-means direction: one held-out
AUROC per layer. The chosen layer (default: the best held-out AUROC, ties to the earlier layer)
and its unit direction are saved as ``feature.safetensors`` + ``feature.json``.

``refteacher feature`` runs this on the built-in prompt sets by default.
"""
from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from safetensors.torch import load_file, save_file

from refteacher.engine.data.prompt_sets import PromptRecord, load_prompt_set, prompt_set_hash, split_records
from refteacher.engine.errors import UserError
from refteacher.engine.metrics import auroc
from refteacher.engine.modeling.chat_prompts import encode_prompts, pad_token_id
from refteacher.engine.modeling.forward import hidden_size, num_layers
from refteacher.engine.modeling.loading import load_model, load_tokenizer, model_fingerprint
from refteacher.engine.modeling.prompt_states import iter_prompt_states
from refteacher.engine.storage import atomic_write, write_json_atomic

FORMAT = "refteacher.feature/1"
FEATURE_FILE = "feature.safetensors"
MANIFEST_FILE = "feature.json"
_MANIFEST_KEYS = ("format", "model", "model_hash", "layer", "position", "hidden_size")


@dataclass
class RefusalFeature:
    """A unit refusal direction ``vector`` (float32 [H]) at decoder layer ``layer``.

    ``position`` is the scored token (-1: the last prompt token), ``model`` the model spec,
    ``model_hash`` its ``models.model_fingerprint``, ``stats`` every figure it was chosen from
    (per-layer held-out AUROC, prompt-set hashes, counts, ...). JSON-serialisable stats only.
    """

    vector: torch.Tensor
    layer: int
    model: str
    model_hash: str
    position: int = -1
    stats: dict[str, Any] = field(default_factory=dict)

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write ``feature.safetensors`` ({"feature": float32 [H]}) and ``feature.json`` into
        ``out_dir`` (created if needed; each file replaced atomically). Returns the directory."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        vector = self.vector.detach().to("cpu", torch.float32).contiguous()
        if vector.dim() != 1 or vector.numel() == 0:
            raise ValueError(f"feature vector must be 1-D and non-empty, got shape {tuple(vector.shape)}")
        manifest = {
            "format": FORMAT,
            "model": str(self.model),
            "model_hash": self.model_hash,
            "layer": int(self.layer),
            "position": int(self.position),
            "hidden_size": int(vector.numel()),
            **self.stats,
        }
        atomic_write(out / FEATURE_FILE, lambda path: save_file({"feature": vector}, str(path)))
        write_json_atomic(out / MANIFEST_FILE, manifest, indent=2)
        return out

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RefusalFeature":
        """Read a feature from its directory (or either of its two files). UserError if invalid."""
        folder = Path(path)
        if folder.is_file():
            folder = folder.parent
        manifest_path, tensor_path = folder / MANIFEST_FILE, folder / FEATURE_FILE
        if not manifest_path.is_file() or not tensor_path.is_file():
            raise UserError(f"{folder} is not a feature directory ({MANIFEST_FILE} + {FEATURE_FILE}); make one with `refteacher feature`")
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"{manifest_path} is not valid JSON ({err.msg}); run `refteacher feature` again") from None
        if manifest.get("format") != FORMAT:
            raise UserError(f"{manifest_path} has format {manifest.get('format')!r}, expected {FORMAT!r}")
        tensors = load_file(str(tensor_path))
        if "feature" not in tensors:
            raise UserError(f"{tensor_path} holds no 'feature' tensor; run `refteacher feature` again")
        vector = tensors["feature"].to(torch.float32)
        if vector.numel() != manifest.get("hidden_size"):
            raise UserError(f"{folder}: the vector has {vector.numel()} values, the manifest says {manifest.get('hidden_size')}")
        stats = {k: v for k, v in manifest.items() if k not in _MANIFEST_KEYS}
        return cls(vector=vector, layer=int(manifest["layer"]), model=manifest["model"],
                   model_hash=manifest["model_hash"], position=int(manifest["position"]), stats=stats)


# --------------------------------------------------------------------------------------------
# Hidden states of the last prompt token, streamed
# --------------------------------------------------------------------------------------------

def _prompt_texts(prompts: Sequence[Any]) -> list[Any]:
    """Accept strings, chat message lists or PromptRecords; return what render_prompt takes."""
    return [getattr(p, "prompt", p) for p in prompts]


def iter_last_token_states(
    model, tokenizer, prompts: Sequence[Any], layers: Sequence[int], batch_size: int = 16,
    *, max_tokens: int | None = None, progress: bool | str = False, prefix_cache: bool = True,
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Yield (prompt indices, states float32 [b, len(layers), H]) batch by batch.

    Prompts (strings, message lists or PromptRecords) are chat-rendered and kept to their last
    ``max_tokens`` tokens, then run by ``prompt_states.iter_prompt_states``: batched by length,
    the decoder only up to ``max(layers)``, and with ``prefix_cache`` the prefix every prompt
    shares (the chat template's system prompt: 24 of ~49 tokens for SmolLM2 on the built-in
    sets) run once. ``progress``: False, True or a tqdm description.
    """
    ids, _ = encode_prompts(tokenizer, _prompt_texts(prompts), max_tokens=max_tokens)
    yield from iter_prompt_states(model, ids, pad_token_id(tokenizer), layers, batch_size, prefix_cache=prefix_cache,
                                  progress=bool(progress), desc=progress if isinstance(progress, str) else "prompts")


def collect_last_token_states(
    model, tokenizer, prompts: Sequence[Any], layers: Sequence[int], batch_size: int = 16,
    *, max_tokens: int | None = None, progress: bool | str = False, prefix_cache: bool = True,
) -> torch.Tensor:
    """Return the last-prompt-token states float32 [N, len(layers), H] in the prompts' order."""
    out = torch.zeros(len(prompts), len(layers), hidden_size(model), dtype=torch.float32)
    for chunk, states in iter_last_token_states(model, tokenizer, prompts, layers, batch_size,
                                                max_tokens=max_tokens, progress=progress,
                                                prefix_cache=prefix_cache):
        out[chunk] = states
    return out


def mean_last_token_states(
    model, tokenizer, prompts: Sequence[Any], layers: Sequence[int], batch_size: int = 16,
    *, max_tokens: int | None = None, progress: bool | str = False, prefix_cache: bool = True,
) -> torch.Tensor:
    """Return the mean last-prompt-token state float64 [len(layers), H], streamed (O(batch) memory)."""
    if not prompts:
        raise UserError("cannot take the mean of an empty prompt set")
    total = None
    for _, states in iter_last_token_states(model, tokenizer, prompts, layers, batch_size,
                                            max_tokens=max_tokens, progress=progress,
                                            prefix_cache=prefix_cache):
        batch_sum = states.double().sum(dim=0)
        total = batch_sum if total is None else total + batch_sum
    return total / len(prompts)


def refusal_directions(
    model, tokenizer, harmful: Sequence[Any], harmless: Sequence[Any], layers: Sequence[int],
    batch_size: int = 16, *, max_tokens: int | None = None, progress: bool = False,
) -> torch.Tensor:
    """Return mean(harmful) - mean(harmless) of last-prompt-token states, float64 [len(layers), H]."""
    harmful_mean = mean_last_token_states(model, tokenizer, harmful, layers, batch_size,
                                          max_tokens=max_tokens, progress="harmful" if progress else False)
    harmless_mean = mean_last_token_states(model, tokenizer, harmless, layers, batch_size,
                                           max_tokens=max_tokens, progress="harmless" if progress else False)
    return harmful_mean - harmless_mean


def cosine_scores(states: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of states [N, L, H] with one direction per layer [L, H] -> [N, L] float64."""
    s = states.double()
    d = directions.double()
    d = d / d.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    return (s * d).sum(-1) / s.norm(dim=-1).clamp_min(1e-30)


def pick_layer(aurocs: dict[int, float]) -> int:
    """Return the layer with the highest AUROC; on a tie, the earlier (cheaper) layer."""
    if not aurocs:
        raise ValueError("no layers to choose from")
    return min(aurocs, key=lambda layer: (-aurocs[layer], layer))


# --------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------

def _sources(prompts: Sequence[Any], default: str) -> list[str]:
    return [getattr(p, "source", default) for p in prompts]


def _set_summary(prompts: Sequence[Any]) -> dict[str, Any]:
    """Return {"sha256", "count", "by_source"} of a prompt set, for the manifest."""
    records = [
        p if isinstance(p, PromptRecord)
        else PromptRecord(p if isinstance(p, str) else json.dumps(p, sort_keys=True), None, "given")
        for p in prompts
    ]
    return {"sha256": prompt_set_hash(records), "count": len(records),
            "by_source": dict(Counter(r.source for r in records))}


def extract_feature(
    model_spec: str,
    harmful: Sequence[Any],
    harmless: Sequence[Any],
    heldout_harmful: Sequence[Any],
    heldout_harmless: Sequence[Any],
    layer: int | None = None,
    *,
    batch_size: int = 16,
    max_tokens: int | None = 512,
    device: str | torch.device | None = None,
    model=None,
    tokenizer=None,
    progress: bool = False,
) -> RefusalFeature:
    """Build the refusal feature of ``model_spec`` from harmful/harmless prompts.

    Prompts are strings, message lists or PromptRecords (whose ``source`` gives per-source
    figures). Every layer 1..L (or 1..``layer`` when given) is scored on the held-out sets by the
    AUROC of cosine similarity with its difference-of-means direction; the feature is the unit
    direction at ``layer`` or, by default, at the best held-out AUROC (ties: the earlier layer).
    ``model`` / ``tokenizer`` may be passed already loaded (e.g. a peft-wrapped teacher).
    """
    for name, prompts in (("harmful", harmful), ("harmless", harmless),
                          ("held-out harmful", heldout_harmful), ("held-out harmless", heldout_harmless)):
        if not prompts:
            raise UserError(f"the {name} prompt set is empty")
    started = time.perf_counter()
    model = model if model is not None else load_model(model_spec, device=device)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_spec)
    total = num_layers(model)
    if layer is not None and not 1 <= layer <= total:
        raise UserError(f"--layer {layer} is out of range: the model has decoder layers 1..{total}")
    layers = list(range(1, (layer or total) + 1))
    kwargs = dict(max_tokens=max_tokens)
    directions = refusal_directions(model, tokenizer, harmful, harmless, layers, batch_size,
                                     progress=progress, **kwargs)
    held_pos = collect_last_token_states(model, tokenizer, heldout_harmful, layers, batch_size,
                                         progress="held-out harmful" if progress else False, **kwargs)
    held_neg = collect_last_token_states(model, tokenizer, heldout_harmless, layers, batch_size,
                                         progress="held-out harmless" if progress else False, **kwargs)
    pos_scores = cosine_scores(held_pos, directions)  # [Np, L]
    neg_scores = cosine_scores(held_neg, directions)  # [Nn, L]
    labels = [1] * len(heldout_harmful) + [0] * len(heldout_harmless)
    per_layer = {k: auroc(torch.cat([pos_scores[:, i], neg_scores[:, i]]), labels) for i, k in enumerate(layers)}
    by_source = _auroc_by_source(pos_scores, neg_scores, _sources(heldout_harmful, "harmful"),
                                 _sources(heldout_harmless, "harmless"), layers)
    chosen = layer if layer is not None else pick_layer(per_layer)
    index = layers.index(chosen)
    direction = directions[index]
    stats = {
        "heldout_auroc": {str(k): v for k, v in per_layer.items()},
        "heldout_auroc_by_source": by_source,
        "chosen_by": "--layer" if layer is not None else "best held-out AUROC (ties: earlier layer)",
        "difference_norm": float(direction.norm()),
        "num_layers": total,
        "prompt_sets": {
            "harmful": _set_summary(harmful), "harmless": _set_summary(harmless),
            "heldout_harmful": _set_summary(heldout_harmful), "heldout_harmless": _set_summary(heldout_harmless),
        },
        "max_tokens": max_tokens,
        "seconds": round(time.perf_counter() - started, 2),
    }
    return RefusalFeature(vector=(direction / direction.norm().clamp_min(1e-30)).float(), layer=chosen,
                          model=str(model_spec), model_hash=model_fingerprint(model_spec), stats=stats)


def _auroc_by_source(pos_scores, neg_scores, pos_sources, neg_sources, layers) -> dict[str, dict[str, float]]:
    """Held-out AUROC per layer for each source against the whole other class: {source: {layer: auroc}}."""
    out: dict[str, dict[str, float]] = {}
    for scores, sources, others in ((pos_scores, pos_sources, neg_scores), (neg_scores, neg_sources, pos_scores)):
        positive_side = scores is pos_scores
        for source in sorted(set(sources)):
            rows = torch.tensor([s == source for s in sources])
            mine = scores[rows]
            pos, neg = (mine, others) if positive_side else (others, mine)
            labels = [1] * len(pos) + [0] * len(neg)
            out[source] = {str(k): auroc(torch.cat([pos[:, i], neg[:, i]]), labels) for i, k in enumerate(layers)}
    return out


# --------------------------------------------------------------------------------------------
# Default data and the CLI
# --------------------------------------------------------------------------------------------

# The default teacher's sets (teacher.config.DEFAULT_SETS), by side.
DEFAULT_HARMFUL = ("matched_pairs:harmful", "advbench", "harmbench")
DEFAULT_HARMLESS = ("matched_pairs:benign", "edgy_benign", "topic_harmless", "everyday")
_PAIR_SIDES = {"matched_pairs:harmful", "matched_pairs:benign"}


def build_default_split(
    harmful_sets: Sequence[str] = DEFAULT_HARMFUL,
    harmless_sets: Sequence[str] = DEFAULT_HARMLESS,
    heldout_fraction: float = 0.2,
    seed: int = 0,
):
    """Load prompt sets and hold out a deterministic content-hashed split of each.

    Returns (harmful, harmless, heldout_harmful, heldout_harmless) lists of PromptRecords.
    Matched pairs are split by pair, so a held-out benign question's harmful twin is held out too.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise UserError(f"--heldout-fraction must be between 0 and 1, got {heldout_fraction}")

    def load(names, label):
        records = []
        for name in names:
            if name in _PAIR_SIDES:  # keep the pair id (group) by loading through both sides
                side = name.split(":")[1]
                records += [r for r in load_prompt_set("matched_pairs") if r.label == side]
            else:
                records += load_prompt_set(name, label=label)
        mislabelled = [r for r in records if r.label not in (None, label)]
        if mislabelled:
            raise UserError(f"{mislabelled[0].source} holds {mislabelled[0].label} prompts but was given as {label}")
        return split_records(records, [1.0 - heldout_fraction, heldout_fraction], seed)

    harmful, heldout_harmful = load(harmful_sets, "harmful")
    harmless, heldout_harmless = load(harmless_sets, "benign")
    return harmful, harmless, heldout_harmful, heldout_harmless


def format_auroc_table(feature: RefusalFeature) -> str:
    """Return the per-layer held-out AUROC table (overall and per source) as text."""
    overall = feature.stats["heldout_auroc"]
    by_source = feature.stats.get("heldout_auroc_by_source", {})
    sources = list(by_source)
    header = ["layer", "all"] + sources
    widths = [max(5, len(h)) for h in header]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
    for key in overall:
        cells = [key, f"{overall[key]:.3f}"] + [f"{by_source[s][key]:.3f}" for s in sources]
        mark = "  <- chosen" if int(key) == feature.layer else ""
        lines.append("  ".join(c.rjust(w) for c, w in zip(cells, widths)) + mark)
    return "\n".join(lines)


def difference_of_means(harmful: torch.Tensor, harmless: torch.Tensor) -> torch.Tensor:
    """Return mean(harmful) - mean(harmless) [H] float32 from [N, H] and [M, H] hidden states."""
    return (harmful.double().mean(0) - harmless.double().mean(0)).float()


def category_directions(harmful: torch.Tensor, categories: Sequence[str | None], *,
                        min_prompts: int = 4) -> dict[str, torch.Tensor]:
    """One direction per hazard category: mean of its prompts' states minus the other harmful ones',
    made orthogonal to the mean harmful state.

    ``harmful`` [N, H] hidden states, ``categories`` their N category slugs (None: unknown, used
    only on the "other" side). Subtracting the other harmful prompts rather than harmless ones
    cancels what every harmful prompt shares (the refusal feature itself), so the directions tell
    kinds of harm apart; and with no component along the mean state, a row's cosine with each
    direction compares only how the row differs from an average harmful prompt (otherwise the
    mean's own projection, different for every direction, would decide the nearest). Categories
    with fewer than ``min_prompts`` prompts, or no other harmful prompts to compare with, get none.
    Returns {slug: [H] float32}, slugs in first-seen order.
    """
    if harmful.shape[0] != len(categories):
        raise ValueError(f"{harmful.shape[0]} states but {len(categories)} categories")
    mean = harmful.double().mean(0)
    unit_mean = mean / mean.norm().clamp_min(1e-12)
    directions = {}
    for slug in dict.fromkeys(c for c in categories if c is not None):
        mine = torch.tensor([c == slug for c in categories])
        if int(mine.sum()) >= min_prompts and bool((~mine).any()):
            direction = difference_of_means(harmful[mine], harmful[~mine]).double()
            directions[slug] = (direction - (direction @ unit_mean) * unit_mean).float()
    return directions
