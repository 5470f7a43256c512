"""Scoring prompts against the refusal feature: length-bucketed batches, one early-exit forward, fused cosine."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from refteacher.engine.data.readers import Prompt, PromptFields, Row
from refteacher.engine.errors import UserError
from refteacher.engine.modeling.attention import flash_attn_installed
from refteacher.engine.modeling.chat_prompts import encode_prompts, pad_token_id, right_pad
from refteacher.engine.modeling.forward import decoder_module, forward_to_layer, forward_to_layers
from refteacher.engine.modeling.prompt_states import PrefixCache, cacheable_prefix
from refteacher.kernels.cosine import refusal_scores

DEFAULT_MAX_PROMPT_TOKENS = 2048
_DEFAULTS = {  # (batch_tokens, window_rows) per device type, picked by benchmarks/bench_filter.py
    "cpu": (8192, 1024),
    "cuda": (65536, 16384),
}


# --------------------------------------------------------------------------------------------
# Options and results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FilterOptions:
    """How to filter. ``None`` means the device default (see ``_DEFAULTS``) or the teacher's threshold.

    ``shard`` is (index, count). ``packed`` None = packed varlen batches when on CUDA with flash-attn.
    """

    threshold: float | None = None
    batch_tokens: int | None = None
    window_rows: int | None = None
    max_prompt_tokens: int | None = DEFAULT_MAX_PROMPT_TOKENS
    shard: tuple[int, int] = (0, 1)
    fields: PromptFields = PromptFields()
    packed: bool | None = None

    def resolved(self, device: torch.device) -> "FilterOptions":
        """Return a copy with the device defaults filled in; UserError for values out of range."""
        batch_default, window_default = _DEFAULTS.get(device.type, _DEFAULTS["cpu"])
        batch_tokens = self.batch_tokens if self.batch_tokens is not None else batch_default
        window_rows = self.window_rows if self.window_rows is not None else window_default
        if batch_tokens < 1:
            raise UserError(f"--batch-tokens must be at least 1, got {batch_tokens}")
        if window_rows < 1:
            raise UserError(f"--window-rows must be at least 1, got {window_rows}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise UserError(f"--max-prompt-tokens must be at least 1, got {self.max_prompt_tokens}")
        index, count = self.shard
        if count < 1 or not 0 <= index < count:
            raise UserError(f"shard {index}/{count} is invalid: use I/N with 0 <= I < N")
        if self.threshold is not None and not math.isfinite(self.threshold):
            raise UserError(f"--threshold must be a finite number, got {self.threshold}")
        packed = self.packed if self.packed is not None else (device.type == "cuda" and flash_attn_installed())
        return FilterOptions(self.threshold, batch_tokens, window_rows, self.max_prompt_tokens, self.shard,
                             self.fields, packed)


# --------------------------------------------------------------------------------------------
# Preparing a window: tokenise, sort by length, batch, pad (runs on the background thread)
# --------------------------------------------------------------------------------------------


@dataclass
class _Batch:
    units: list[int]  # indices into the window's units
    input_ids: torch.Tensor  # [B, T] long, or [1, sum] when packed
    attention_mask: torch.Tensor | None  # [B, T] long; None when packed, or equal lengths with no prefix
    last_index: torch.Tensor  # [B] long: each unit's last token (in the packed row when packed)
    position_ids: torch.Tensor | None = None  # [1, sum] long when packed
    tokens: int = 0
    padded_tokens: int = 0


@dataclass
class _Window:
    index: int
    rows: list[Row]
    unit_rows: list[int] = field(default_factory=list)  # unit -> row position in the window
    unit_truncated: list[bool] = field(default_factory=list)
    batches: list[_Batch] = field(default_factory=list)
    prefix: list[int] = field(default_factory=list)  # token ids every unit starts with, cut from the batches


def _tokenise(rows: list[Row], tokenizer, max_tokens: int | None) -> tuple[list[int], list[list[int]], list[bool]]:
    """Encode every prompt of the readable rows; rows that fail to render get a reason instead.

    Returns (unit -> row position, token ids per unit, truncated per unit).
    """
    owners = [pos for pos, row in enumerate(rows) if row.reason is None for _ in row.prompts]
    prompts = [p for row in rows if row.reason is None for p in row.prompts]
    try:
        ids, truncated = encode_prompts(tokenizer, prompts, max_tokens=max_tokens)
    except Exception:  # one bad row (template error, odd text): find it row by row
        owners, ids, truncated = [], [], []
        for pos, row in enumerate(rows):
            if row.reason is not None:
                continue
            try:
                row_ids, row_truncated = encode_prompts(tokenizer, row.prompts, max_tokens=max_tokens)
            except Exception as err:
                row.reason = f"could not render or tokenise the prompt ({type(err).__name__}: {err})"
                continue
            owners += [pos] * len(row_ids)
            ids += row_ids
            truncated += row_truncated
    for unit, seq in enumerate(ids):
        if not seq:
            rows[owners[unit]].reason = "the prompt rendered to no tokens"
    keep = [u for u in range(len(ids)) if rows[owners[u]].reason is None]
    return [owners[u] for u in keep], [ids[u] for u in keep], [truncated[u] for u in keep]


def _length_batches(lengths: Sequence[int], batch_tokens: int, max_waste: float = 0.1) -> list[list[int]]:
    """Group unit indices, sorted by length, into batches of at most ``batch_tokens`` padded tokens.

    A batch is also closed early, once it holds a quarter of ``batch_tokens``, when adding the next
    (longer) unit would make more than ``max_waste`` of its tokens padding. A unit longer than
    ``batch_tokens`` gets a batch of its own. Deterministic (ties broken by index).
    """
    order = sorted(range(len(lengths)), key=lambda u: (lengths[u], u))
    batches: list[list[int]] = []
    current: list[int] = []
    real = 0
    for unit in order:
        width = lengths[unit]
        padded = (len(current) + 1) * width
        too_big = padded > batch_tokens
        wasteful = len(current) * width >= batch_tokens // 4 and padded - (real + width) > max_waste * padded
        if current and (too_big or wasteful):
            batches.append(current)
            current, real = [], 0
        current.append(unit)
        real += width
    if current:
        batches.append(current)
    return batches


def _packed_batch(units: list[int], seqs: list[list[int]]) -> _Batch:
    """Concatenate sequences into one row [1, sum] with per-sequence position ids (varlen attention)."""
    flat: list[int] = []
    positions: list[int] = []
    last: list[int] = []
    for seq in seqs:
        flat += seq
        positions += range(len(seq))
        last.append(len(flat) - 1)
    return _Batch(
        units,
        torch.tensor([flat], dtype=torch.long),
        None,
        torch.tensor(last, dtype=torch.long),
        position_ids=torch.tensor([positions], dtype=torch.long),
        tokens=len(flat),
        padded_tokens=len(flat),
    )


def _prepare_window(index: int, rows: list[Row], tokenizer, options: FilterOptions, pin: bool) -> _Window:
    """Tokenise a window's rows and build its length-sorted, padded (or packed) batches on CPU."""
    window = _Window(index, rows)
    owners, ids, truncated = _tokenise(rows, tokenizer, options.max_prompt_tokens)
    window.unit_rows, window.unit_truncated = owners, truncated
    pad_id = pad_token_id(tokenizer)
    max_waste = 1.0 if options.packed else 0.1  # packed batches hold no padding at all
    window.prefix = [] if options.packed else cacheable_prefix(ids)
    shared = len(window.prefix)
    for units in _length_batches([len(s) - shared for s in ids], options.batch_tokens, max_waste):
        seqs = [ids[u][shared:] for u in units]
        if options.packed:
            batch = _packed_batch(units, seqs)
        else:
            input_ids, attention_mask, last_index = right_pad(seqs, pad_id)
            if not shared and bool(attention_mask.all()):
                attention_mask = None  # equal lengths, no prefix: plain causal attention, no mask to build
            batch = _Batch(units, input_ids, attention_mask, last_index,
                           tokens=sum(len(s) + shared for s in seqs), padded_tokens=input_ids.numel())
        if pin:
            batch.input_ids = batch.input_ids.pin_memory()
        window.batches.append(batch)
    return window


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


def _use_flash_attention(model) -> None:
    """Switch a loaded model to flash-attn 2 (needed for packed batches); UserError if it cannot."""
    setter = getattr(model, "set_attn_implementation", None)
    if setter is None:
        raise UserError("this transformers version cannot switch attention; pass --no-packed")
    try:
        setter("flash_attention_2")
    except (ImportError, ValueError) as err:
        raise UserError(f"packed batches need flash-attn 2 ({err}); install flash-attn or pass --no-packed") from None


def _prefix_cache(model, window: _Window, layer: int) -> PrefixCache | None:
    """The KV cache of the window's shared prefix up to ``layer`` (None without one). May raise."""
    return PrefixCache(model, window.prefix, layer) if window.prefix else None


def _score_batch(model, features: torch.Tensor, layer: int, batch: _Batch, device: torch.device,
                 prefix: PrefixCache | None = None) -> list[list[float]]:
    """Run one batch to the feature layer and return each unit's cosines against ``features``. May raise.

    ``features`` [C, H]: the refusal feature first, then any category directions, all scored in one
    fused cosine pass. Returns one list of C floats per unit. ``prefix``: the cache of the tokens
    cut from the front of every row of a padded batch.
    """
    input_ids = batch.input_ids.to(device, non_blocking=True)
    mask = batch.attention_mask.to(device, non_blocking=True) if batch.attention_mask is not None else None
    last = batch.last_index.to(device, non_blocking=True)
    if batch.position_ids is None:
        decoder_kwargs = None
        if prefix is not None:  # a window with a prefix keeps every batch's mask
            mask, decoder_kwargs = prefix.continue_with(mask)
        hidden = forward_to_layers(model, input_ids, mask, [layer], decoder_kwargs=decoder_kwargs)[0]
        scores = refusal_scores(hidden, features, last)
    else:
        position_ids = batch.position_ids.to(device, non_blocking=True)

        def add_position_ids(module, args, kwargs):
            kwargs["position_ids"] = position_ids
            return args, kwargs

        handle = decoder_module(model).register_forward_pre_hook(add_position_ids, with_kwargs=True)
        try:
            hidden = forward_to_layer(model, input_ids, None, layer)  # [1, sum, H]
        finally:
            handle.remove()
        scores = refusal_scores(hidden[0].index_select(0, last), features, None)
    scores = scores.float().cpu()
    if not bool(torch.isfinite(scores).all()):
        raise FloatingPointError("the model produced a non-finite score")
    return scores.tolist()


def score_prompts(teacher, prompts: Sequence[Prompt], *, batch_tokens: int | None = None,
                  max_prompt_tokens: int | None = DEFAULT_MAX_PROMPT_TOKENS) -> list[float]:
    """Return the refusal score (float) of each prompt (a string or a chat message list), in order.

    ``teacher`` is a loaded ``Teacher``. Prompts are length-sorted into batches as in the filter.
    Raises whatever scoring raises (no fail-closed handling here: there are no rows to reject).
    """
    device = next(teacher.model.parameters()).device
    options = FilterOptions(batch_tokens=batch_tokens, max_prompt_tokens=max_prompt_tokens,
                            packed=False).resolved(device)
    rows = [Row(i + 1, i + 1, None, prompts=[p]) for i, p in enumerate(prompts)]
    window = _prepare_window(0, rows, teacher.tokenizer, options, pin=False)
    bad = [row for row in rows if row.reason is not None]
    if bad:
        raise UserError(f"prompt {bad[0].id - 1} cannot be scored: {bad[0].reason}")
    scores = [0.0] * len(rows)
    with torch.inference_mode():
        prefix = _prefix_cache(teacher.model, window, teacher.layer)
        for batch in window.batches:
            for unit, values in zip(batch.units, _score_batch(teacher.model, teacher.feature[None], teacher.layer,
                                                              batch, device, prefix)):
                scores[window.unit_rows[unit]] = values[0]
    return scores
