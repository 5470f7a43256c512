"""Claim: the streaming filter scores prompts >= 2.5x faster than the naive pipeline (2 CPU cores).

Both sides score the same prompts (the built-in prompt sets, shuffled) with the same model and
feature, in one process:

- naive: what a user would write: prompts in input order, batches of ``--naive-batch-size``
  padded to their longest row, a full forward with ``output_hidden_states=True`` (every layer and
  the LM head), the last prompt token's hidden state at the feature layer, ``F.cosine_similarity``.
- filter: ``refteacher.engine.filter.run.run_filter`` end to end on a JSONL file (reading, chat
  template, length-sorted batches of ``--batch-tokens``, forward stopped at the feature layer,
  fused scoring, the three output files with checkpoints).

A third side, ``filter_categories``, runs the filter with one direction per hazard category
(18, random: the cost does not depend on what they are) scored in the same fused pass, so a
flagged row also gets its ``_category``; its cost is reported against the plain filter's rows/s.

The teacher is the untouched default model with a difference-of-means feature at ``--layer``
(default: the middle layer), built by ``build_speed_teacher``; speed does not depend on how good
the feature is. The scores of both sides must agree within 1e-3. Run with ``--quick`` for a short
check; ``--json PATH`` writes the figures. The machine's load average is recorded, since other
jobs on a shared machine slow both sides.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import environment, format_table, peak_memory, write_json  # noqa: E402

from refteacher.engine.data.hazard_taxonomy import CATEGORY_SLUGS
from refteacher.engine.data.readers import open_source
from refteacher.engine.filter.run import run_filter
from refteacher.engine.filter.scoring import FilterOptions
from refteacher.engine.modeling.chat_prompts import encode_prompts, right_pad
from refteacher.engine.modeling.forward import hidden_at, num_layers
from refteacher.engine.modeling.loading import DEFAULT_MODEL, load_model, load_tokenizer, model_fingerprint
from refteacher.engine.modeling.teacher_dir import load_teacher, save_teacher_dir

AGREEMENT = 1e-3


def prompts_dir() -> Path:
    """Return the shared prompt-set folder (../shared/data/prompts, or $REFTEACHER_SHARED_PROMPTS)."""
    default = Path(__file__).resolve().parents[2] / "shared" / "data" / "prompts"
    return Path(os.environ.get("REFTEACHER_SHARED_PROMPTS", default))


def load_prompt_sets(folder: Path) -> dict[str, list[str]]:
    """Return {"harmful": [...], "harmless": [...]} from the four JSONL prompt sets in ``folder``."""
    harmful, harmless = [], []
    for name in ("advbench", "harmbench", "edgy_benign", "matched_pairs"):
        for line in (folder / f"{name}.jsonl").read_text().splitlines():
            row = json.loads(line)
            if name == "matched_pairs":
                harmful.append(row["harmful"])
                harmless.append(row["benign"])
            elif row.get("label") == "harmful":
                harmful.append(row["prompt"])
            else:
                harmless.append(row["prompt"])
    return {"harmful": harmful, "harmless": harmless}


def benchmark_prompts(rows: int) -> list[str]:
    """``rows`` prompts: both sides of the shared prompt sets, shuffled (seed 0), repeated as needed."""
    sets = load_prompt_sets(prompts_dir())
    prompts = sets["harmful"] + sets["harmless"]
    random.Random(0).shuffle(prompts)
    return (prompts * (rows // len(prompts) + 1))[:rows]


def build_speed_teacher(out_dir: str | Path, *, model_spec: str = DEFAULT_MODEL, layer: int | None = None,
                        per_side: int = 16, model=None, tokenizer=None) -> Path:
    """Write a teacher dir: the untouched model + a difference-of-means feature at ``layer``.

    The feature is mean(harmful) - mean(harmless) of last-token hidden states over ``per_side``
    prompts each; the threshold is the midpoint of the two sides' mean scores. For speed
    measurements only (the untouched default model is not safety-aligned). Returns the dir.
    """
    model = model if model is not None else load_model(model_spec, device="cpu")
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_spec)
    layer = num_layers(model) // 2 if layer is None else layer
    sets = load_prompt_sets(prompts_dir())

    def mean_state(prompts: list[str]) -> torch.Tensor:
        ids, _ = encode_prompts(tokenizer, prompts)
        input_ids, mask, last = right_pad(ids, tokenizer.pad_token_id)
        with torch.inference_mode():
            return hidden_at(model, input_ids, mask, layer, last).float()

    harmful = mean_state(sets["harmful"][:per_side])
    harmless = mean_state(sets["harmless"][:per_side])
    feature = harmful.mean(0) - harmless.mean(0)
    unit = feature / feature.norm()
    threshold = 0.5 * (F.cosine_similarity(harmful, unit[None]).mean() + F.cosine_similarity(harmless, unit[None]).mean())
    return save_teacher_dir(
        out_dir, model_spec=model_spec, model_hash=model_fingerprint(model_spec), feature=feature,
        layer=layer, threshold=float(threshold),
        calibration={"note": f"speed-benchmark teacher: difference of means over {per_side}+{per_side} prompts"},
    )


def naive_scores(model, tokenizer, feature: torch.Tensor, layer: int, prompts: list[str], batch_size: int
                 ) -> tuple[list[float], int]:
    """The naive pipeline; returns (scores in input order, padded tokens computed)."""
    scores: list[float] = []
    padded = 0
    tokenizer.padding_side = "right"
    device = next(model.parameters()).device
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                   add_generation_prompt=True)
                     for p in prompts[start:start + batch_size]]
            batch = tokenizer(texts, padding=True, add_special_tokens=False, return_tensors="pt").to(device)
            out = model(**batch, output_hidden_states=True)
            hidden = out.hidden_states[layer]
            last = batch["attention_mask"].sum(1) - 1
            rows = hidden[torch.arange(len(texts), device=device), last].float()
            scores += F.cosine_similarity(rows, feature[None].float(), dim=-1).tolist()
            padded += batch["input_ids"].numel()
    return scores, padded


def filter_scores(teacher, path: Path, out_dir: Path, options: FilterOptions) -> tuple[list[float], dict]:
    """Run the filter on a JSONL of prompts; return (scores by row id order, report)."""
    report = run_filter(teacher, open_source(str(path)), out_dir, options, overwrite=True, progress=False, plot=False)
    by_id = {}
    for name in ("kept.jsonl", "flagged.jsonl"):
        for line in (out_dir / name).read_text().splitlines():
            row = json.loads(line)
            by_id[row["_id"]] = row["_score"]
    return [by_id[i] for i in sorted(by_id)], report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="64 prompts instead of --rows")
    parser.add_argument("--rows", type=int, default=512, help="prompts to score (default 512)")
    parser.add_argument("--layer", type=int, default=None, help="feature layer (default: the middle layer)")
    parser.add_argument("--batch-tokens", type=int, default=None, help="filter batch size in tokens (default: the filter's)")
    parser.add_argument("--naive-batch-size", type=int, default=32, help="rows per naive batch (default 32)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--repeat", type=int, default=None,
                        help="timed runs per side, alternating, best kept (default 2; 1 with --quick)")
    parser.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = 64 if args.quick else args.rows
    repeat = args.repeat if args.repeat is not None else (1 if args.quick else 2)
    load_before = os.getloadavg()

    prompts = benchmark_prompts(rows)

    with tempfile.TemporaryDirectory(prefix="bench_filter_") as tmp:
        tmp = Path(tmp)
        teacher_dir = build_speed_teacher(tmp / "teacher", layer=args.layer)
        teacher = load_teacher(teacher_dir, device=device)
        data = tmp / "prompts.jsonl"
        data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
        warm = tmp / "warm.jsonl"
        warm.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts[:8]))
        options = FilterOptions(batch_tokens=args.batch_tokens)
        model, tokenizer, feature, layer = teacher.model, teacher.tokenizer, teacher.feature, teacher.layer

        naive_scores(model, tokenizer, feature, layer, prompts[:8], args.naive_batch_size)  # warm-up
        filter_scores(teacher, warm, tmp / "warm_out", options)

        result: dict = {"naive_s": float("inf"), "filter_s": float("inf"), "categories_s": float("inf")}
        generator = torch.Generator().manual_seed(0)
        categorised = replace(teacher, categories=CATEGORY_SLUGS, category_directions=torch.randn(
            len(CATEGORY_SLUGS), feature.numel(), generator=generator).to(feature.device))

        def run_naive() -> None:
            start = time.perf_counter()
            result["naive"], result["naive_padded"] = naive_scores(model, tokenizer, feature, layer, prompts,
                                                                   args.naive_batch_size)
            result["naive_s"] = min(result["naive_s"], time.perf_counter() - start)

        def run_filter_side() -> None:
            start = time.perf_counter()
            result["filter"], result["report"] = filter_scores(teacher, data, tmp / "out", options)
            result["filter_s"] = min(result["filter_s"], time.perf_counter() - start)

        def run_categories_side() -> None:
            start = time.perf_counter()
            result["categories"], result["categories_report"] = filter_scores(categorised, data, tmp / "out_cat",
                                                                              options)
            result["categories_s"] = min(result["categories_s"], time.perf_counter() - start)

        # the filter first: the CPU figure is resident-set growth, and the naive side's far larger
        # buffers (all hidden states, full logits) would otherwise leave a heap the filter reuses
        filter_peak = peak_memory(run_filter_side, device)
        run_categories_side()
        naive_peak = peak_memory(run_naive, device)
        for _ in range(repeat - 1):  # A B B A ...: both sides see the same drift in machine load
            run_naive()
            run_categories_side()
            run_filter_side()

    diff = max(abs(a - b) for a, b in zip(result["naive"], result["filter"]))
    same_verdicts = result["categories"] == result["filter"]  # the categories never move a score
    report = result["report"]
    figures = {
        "benchmark": "filter",
        "quick": args.quick,
        "model": DEFAULT_MODEL,
        "layer": teacher.layer,
        "num_layers": num_layers(teacher.model),
        "rows": rows,
        "prompt_tokens": report["throughput"]["tokens"],
        "naive": {
            "seconds": round(result["naive_s"], 3),
            "rows_per_s": round(rows / result["naive_s"], 3),
            "padded_tokens": result["naive_padded"],
            "batch_size": args.naive_batch_size,
            "peak_memory_mb": round(naive_peak / 2**20, 1),
        },
        "filter": {
            "seconds": round(result["filter_s"], 3),
            "rows_per_s": round(rows / result["filter_s"], 3),
            "padded_tokens": report["throughput"]["padded_tokens"],
            "batch_tokens": report["settings"]["batch_tokens"],
            "peak_memory_mb": round(filter_peak / 2**20, 1),
        },
        "filter_categories": {
            "seconds": round(result["categories_s"], 3),
            "rows_per_s": round(rows / result["categories_s"], 3),
            "categories": len(CATEGORY_SLUGS),
            "flagged_by_category": result["categories_report"]["flagged_by_category"],
        },
        "category_cost": round(1.0 - result["filter_s"] / result["categories_s"], 4),
        "category_scores_equal": same_verdicts,
        "repeat": repeat,
        "speedup": round(result["naive_s"] / result["filter_s"], 3),
        "max_abs_score_diff": diff,
        "scores_agree": diff <= AGREEMENT,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "environment": environment(device),
    }
    table = [
        {"side": "naive", **{k: figures["naive"][k] for k in ("seconds", "rows_per_s", "padded_tokens", "peak_memory_mb")}},
        {"side": "filter", **{k: figures["filter"][k] for k in ("seconds", "rows_per_s", "padded_tokens", "peak_memory_mb")}},
        {"side": "filter + 18 categories", **{k: figures["filter_categories"][k] for k in ("seconds", "rows_per_s")}},
    ]
    print(format_table(table, ["side", "seconds", "rows_per_s", "padded_tokens", "peak_memory_mb"]))
    print(f"speedup {figures['speedup']:.2f}x on {rows} prompts, layer {figures['layer']}/{figures['num_layers']}, "
          f"max |score diff| {diff:.2e} ({'agree' if figures['scores_agree'] else 'DISAGREE'} within {AGREEMENT}); "
          f"load average {figures['load_average_before'][0]} -> {figures['load_average_after'][0]} "
          f"on {figures['environment']['device']}; category scores cost {figures['category_cost']:.1%} of rows/s")
    if args.json:
        write_json(args.json, figures)
    return 0 if figures["scores_agree"] and same_verdicts else 1


if __name__ == "__main__":
    sys.exit(main())
