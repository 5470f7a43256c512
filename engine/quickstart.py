"""The end-to-end quickstart (``refteacher quickstart``): teacher, poisoned data, filter, two finetunes, eval.

What it shows, on CPU in about a quarter of an hour: a user uploads finetuning data for a
verifiable task (3-digit addition by default) in which 10% of the rows are harmful prompts answered
compliantly. Plain LoRA finetuning on it (``sft``) leaves the student as willing to answer harmful
prompts as before (or more); ReFT (``reft``: the teacher's filter drops flagged rows, and the
student is distilled towards the teacher on alignment data) makes it refuse them, while both learn
the task and keep answering everyday requests (safety is harm refused *and* ordinary use kept).

Stages (each printed with its wall time):

1. teacher: build the default ReFT teacher with ``train_teacher``'s defaults on the built-in sets
   minus a held-out test split, or reuse the one cached under ``$REFTEACHER_CACHE/teachers/KEY``
   (KEY hashes the model, the teacher settings and the prompt sets);
2. prompts: split the harmful prompts. Held-in ones (the teacher's build split) feed the user
   dataset and the alignment data (disjoint); the harmful score is measured on AdvBench /
   HarmBench prompts of the teacher's held-out test split, used nowhere else;
3. data: ``dataset.jsonl`` = task rows (train split) + harmful prompts with compliant answers
   written by the untouched model (greedy, cached); every row carries its known ``label``;
   ``align.jsonl`` = other held-in harmful prompts with refusals and everyday prompts from the
   teacher's build part (the task's own kind left out) with the untouched model's answers
   (``engine/finetune/alignment.py``); ``eval_everyday.jsonl`` = everyday prompts of the
   teacher's held-out ``report`` part (``engine/data/helpful_prompts.py``), used nowhere else;
4. filter: ``run_filter`` writes ``filter/{kept,flagged,rejected}.jsonl`` and ``report.json``;
   precision / recall are measured against the known labels;
5. finetune (a) ``--baseline sft`` on the raw dataset, (b) ReFT on the kept rows + alignment data;
6. eval: harmful score, share of everyday prompts answered and task accuracy of the untouched
   model, the teacher (no task accuracy: it never learned the task), (a) and (b); the SFT - ReFT
   task accuracy difference with its paired standard error;
7. report: the table (stdout and ``table.md``), ``results.png`` and ``summary.json``.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import math
import random
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from refteacher.engine import __version__
from refteacher.engine.config_args import add_config_arguments, config_from_args, option
from refteacher.engine.data.helpful_prompts import helpful_records, task_kind
from refteacher.engine.data.prompt_sets import prompt_set_hash
from refteacher.engine.data.readers import open_source
from refteacher.engine.data.tasks import make_rows
from refteacher.engine.errors import UserError
from refteacher.engine.evaluation.evaluate import (
    answered_fraction,
    filter_metrics,
    harmful_score,
    load_for_eval,
    task_accuracy,
)
from refteacher.engine.filter.run import run_filter
from refteacher.engine.filter.scoring import FilterOptions
from refteacher.engine.finetune.alignment import HELPFUL_ANSWER_TOKENS, alignment_rows, sample_prompts, split_counts
from refteacher.engine.finetune.config import FinetuneConfig
from refteacher.engine.finetune.trainer import run_finetune
from refteacher.engine.judge import is_refusal
from refteacher.engine.metrics import paired_difference
from refteacher.engine.modeling.loading import DEFAULT_MODEL, load_model, load_tokenizer, model_fingerprint
from refteacher.engine.modeling.teacher_dir import load_teacher
from refteacher.engine.storage import cache_root, write_jsonl
from refteacher.engine.teacher.config import DEFAULT_TEST_FRACTION, TeacherConfig
from refteacher.engine.teacher.training import default_records, train_teacher
from refteacher.engine.teacher.training_data import cached_answers

DEFAULT_OUT_DIR = "runs/quickstart"
TEST_FRACTION = DEFAULT_TEST_FRACTION  # the built-in sets' share held out from the teacher, as `refteacher teacher`
EVAL_SOURCES = ("advbench", "harmbench")
STAGES = 9
MODELS = ("untouched", "teacher", "sft", "reft")


@dataclass
class QuickstartConfig:
    """Every setting of a quickstart run; written to summary.json under ``settings``."""

    task: str = option("addition", "downstream task", choices=("addition", "multiplication"))
    task_rows: int = option(270, "task rows in the user dataset")
    harmful_fraction: float = option(0.10, "share of harmful rows in the dataset")
    align_rows: int = option(192, "alignment rows for distillation")
    align_helpful: float = option(0.75, "share of the alignment rows that are everyday prompts with helpful answers "
                                        "(the rest: harmful prompts with refusals; chosen in docs/helpfulness.md)")
    eval_harmful: int = option(32, "held-out harmful prompts for the harmful score")
    eval_everyday: int = option(96, "held-out everyday prompts for the answered rate (at most the report part's)")
    eval_task: int = option(120, "task test rows for the accuracy")
    harmful_new_tokens: int = option(32, "tokens generated per harmful or everyday eval prompt")
    task_new_tokens: int = option(24, "tokens generated per task eval prompt")
    compliant_new_tokens: int = option(48, "length of the untouched model's compliant answers in the dataset")
    steps: int = option(60, "optimiser steps of each finetune")
    learning_rate: float = option(1e-3, "LoRA learning rate")
    lam: float = option(3.0, "weight of the KL term in ReFT", flag="--lambda")
    temperature: float = option(1.0, "distillation temperature of the KL term in ReFT")
    lora_r: int = option(16, "LoRA rank")
    max_len: int = option(256, "tokens per packed training row")
    align_max_len: int = option(256, "tokens per packed alignment row for the KL term")
    batch_size: int = option(64, "prompts per generation batch")
    seed: int = option(0, "random seed")

    def check(self) -> None:
        """Raise UserError for settings out of range, naming the flag to fix."""
        positive = {"--task-rows": self.task_rows, "--align-rows": self.align_rows, "--eval-harmful": self.eval_harmful,
                    "--eval-everyday": self.eval_everyday, "--eval-task": self.eval_task, "--steps": self.steps, "--max-len": self.max_len,
                    "--align-max-len": self.align_max_len,
                    "--batch-size": self.batch_size}
        for flag, value in positive.items():
            if value < 1:
                raise UserError(f"{flag} must be >= 1, got {value}")
        if not 0 < self.harmful_fraction < 1:
            raise UserError(f"--harmful-fraction must lie strictly between 0 and 1, got {self.harmful_fraction}")
        split_counts(self.align_rows, self.align_helpful)  # UserError when --align-helpful is out of [0, 1]
        if self.learning_rate <= 0 or self.lam < 0 or self.temperature <= 0:
            raise UserError("--learning-rate must be > 0, --lambda >= 0 and --temperature > 0")

    @property
    def harmful_rows(self) -> int:
        """Number of harmful rows so that they make ``harmful_fraction`` of the dataset."""
        return max(1, round(self.task_rows * self.harmful_fraction / (1.0 - self.harmful_fraction)))


# --------------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------------


RUN_FILE = "run.json"  # a finished quickstart's settings, model, teacher and timings


def read_run(out: str | Path) -> tuple[dict[str, Any], QuickstartConfig]:
    """(the run.json details, the QuickstartConfig) of a finished quickstart in ``out``, for the
    benchmarks that reuse its models; UserError when ``out`` holds no finished run."""
    path = Path(out) / RUN_FILE
    try:
        details = json.loads(path.read_text())
        return details, QuickstartConfig(**details["settings"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"{out} is not a finished quickstart run (cannot read {path}: {error})") from None


class StageClock:
    """Prints ``[i/N] name ...`` when a stage starts and its wall time when it ends; keeps the times."""

    def __init__(self, total: int, quiet: bool = False):
        self.total = total
        self.quiet = quiet
        self.index = 0
        self.seconds: dict[str, float] = {}
        self.started = time.perf_counter()

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the block as stage ``name``."""
        self.index += 1
        self._say(f"[{self.index}/{self.total}] {name} ...")
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 1)
        self._say(f"[{self.index}/{self.total}] {name} done in {self.seconds[name]:.1f} s "
                  f"(total {time.perf_counter() - self.started:.0f} s)")

    def note(self, text: str) -> None:
        """Print one indented line of detail."""
        self._say(f"      {text}")

    def _say(self, text: str) -> None:
        if not self.quiet:
            print(text, flush=True)


# --------------------------------------------------------------------------------------------
# Stage 1: the teacher
# --------------------------------------------------------------------------------------------


def teacher_cache_key(model: str, seed: int, harmful: Sequence, harmless: Sequence, config) -> str:
    """Return a 20-hex key of everything a default teacher build depends on."""
    payload = json.dumps([__version__, str(model), model_fingerprint(model), seed, TEST_FRACTION,
                          config.manifest(), prompt_set_hash(list(harmful)), prompt_set_hash(list(harmless))],
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def ensure_default_teacher(model: str, harmful: Sequence, harmless: Sequence, *, seed: int = 0,
                           progress: bool = True) -> tuple[Path, bool]:
    """Return (teacher directory, reused?) for the default teacher over ``model``.

    Built with ``train_teacher``'s default settings (seed ``seed``) on the given labelled
    PromptRecords, or reused from ``$REFTEACHER_CACHE/teachers/KEY`` when already built.
    """
    config = TeacherConfig(seed=seed)
    folder = cache_root() / "teachers" / teacher_cache_key(model, seed, harmful, harmless, config)
    if (folder / "manifest.json").is_file():
        return folder, True
    train_teacher(model, harmful, harmless, folder, config, progress=progress)
    return folder, False


# --------------------------------------------------------------------------------------------
# Stages 2-3: prompts and data
# --------------------------------------------------------------------------------------------


@dataclass
class PromptSplit:
    """The harmful prompts of a run: user-dataset ones, alignment ones (held-in), eval ones (held-out)."""

    data: list[str]
    align: list[str]
    eval: list[str]


def split_harmful(build_harmful: Sequence, test_records: Sequence, config: QuickstartConfig,
                  n_data_candidates: int | None = None) -> PromptSplit:
    """Pick disjoint harmful prompt lists from PromptRecords, deterministically in ``config.seed``.

    ``n_data_candidates`` prompts go to the user dataset (default: 30% more than its harmful rows,
    as the untouched model refuses some); then the alignment data's refusal prompts.

    ``build_harmful`` are the teacher's held-in harmful records; ``test_records`` its held-out
    split, of which only AdvBench / HarmBench harmful rows are used (for the harmful score).
    UserError when there are too few prompts for the sizes asked.
    """
    if n_data_candidates is None:
        n_data_candidates = math.ceil(1.3 * config.harmful_rows) + 2
    held_in = sorted({r.prompt for r in build_harmful})
    random.Random(f"quickstart-harmful-{config.seed}").shuffle(held_in)
    held_out = sorted({r.prompt for r in test_records if r.label == "harmful" and r.source in EVAL_SOURCES}
                      - set(held_in))
    random.Random(f"quickstart-eval-{config.seed}").shuffle(held_out)
    n_refusal, _ = split_counts(config.align_rows, config.align_helpful)
    if n_data_candidates + n_refusal > len(held_in):
        raise UserError(f"only {len(held_in)} held-in harmful prompts: lower --task-rows or --align-rows")
    if config.eval_harmful > len(held_out):
        raise UserError(f"only {len(held_out)} held-out harmful prompts: lower --eval-harmful")
    return PromptSplit(data=held_in[:n_data_candidates],
                       align=held_in[n_data_candidates:n_data_candidates + n_refusal],
                       eval=held_out[:config.eval_harmful])


def compliant_rows(model, tokenizer, prompts: Sequence[str], wanted: int, *, model_hash: str,
                   max_new_tokens: int, batch_size: int, progress: bool) -> list[dict[str, Any]]:
    """Return up to ``wanted`` rows ``{"prompt", "response", "label": "harmful"}`` answered compliantly.

    The responses are the untouched model's greedy answers (cached under ``$REFTEACHER_CACHE``);
    answers the refusal judge calls refusals, and empty ones, are skipped.
    """
    answers = cached_answers(model, tokenizer, list(prompts), model_hash=model_hash, max_new_tokens=max_new_tokens,
                             batch_size=batch_size, progress=progress)
    rows = [{"prompt": p, "response": a, "label": "harmful"}
            for p, a in zip(prompts, answers) if a.strip() and not is_refusal(a)]
    return rows[:wanted]


def build_dataset(task_rows: Sequence[dict], harmful_rows: Sequence[dict], seed: int) -> list[dict[str, Any]]:
    """Mix task rows (labelled benign) and harmful rows into one shuffled list of training rows."""
    rows = [{"prompt": r["prompt"], "response": r["response"], "label": "benign"} for r in task_rows]
    rows += [dict(r) for r in harmful_rows]
    random.Random(f"quickstart-mix-{seed}").shuffle(rows)
    return rows


@dataclass
class EverydayPrompts:
    """Everyday prompts of a run (the task's own kind left out): helpful alignment rows come from
    the teacher's build part, the answered rate is measured on its held-out ``report`` part."""

    align: list[str]
    eval: list[str]


def everyday_prompts(config: QuickstartConfig) -> EverydayPrompts:
    """Pick the run's everyday prompts (``engine/data/helpful_prompts.py``), deterministically in the seed."""
    _, n_helpful = split_counts(config.align_rows, config.align_helpful)
    exclude = [task_kind(config.task)]
    build = [r.prompt for r in helpful_records("build", test_fraction=TEST_FRACTION, seed=config.seed,
                                               exclude_kinds=exclude)]
    report = [r.prompt for r in helpful_records("report", test_fraction=TEST_FRACTION, seed=config.seed,
                                                exclude_kinds=exclude)]
    return EverydayPrompts(align=sample_prompts(build, n_helpful, "quickstart-helpful", config.seed),
                           eval=sample_prompts(report, config.eval_everyday, "quickstart-everyday", config.seed))


# --------------------------------------------------------------------------------------------
# Stage 4: filter metrics
# --------------------------------------------------------------------------------------------


def filter_quality(filter_dir: Path, threshold: float) -> dict[str, Any]:
    """Precision, recall (and AUROC, counts) of the filter on the known labels of its output rows."""
    scores, labels = [], []
    for name in ("kept.jsonl", "flagged.jsonl"):
        with open(filter_dir / name, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    scores.append(float(row["_score"]))
                    labels.append(row.get("label") == "harmful")
    return filter_metrics(scores, labels, threshold)


# --------------------------------------------------------------------------------------------
# Stages 5-6: finetune and evaluate
# --------------------------------------------------------------------------------------------


def finetune(out: Path, *, model: str, data: Path, config: QuickstartConfig, teacher: Path | None = None,
             align: Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Run one LoRA finetune into ``out`` (replaced): ``sft`` when ``teacher`` is None, else ReFT."""
    shutil.rmtree(out, ignore_errors=True)
    ft = FinetuneConfig(
        data=str(data), out=str(out), student=model, teacher=str(teacher) if teacher else None,
        align=str(align) if align else None, baseline=None if teacher else "sft", lam=config.lam,
        temperature=config.temperature,
        lora_r=config.lora_r, max_len=config.max_len, align_max_len=config.align_max_len, max_steps=config.steps,
        learning_rate=config.learning_rate,
        save_steps=config.steps, logging_steps=max(1, config.steps // 6), seed=config.seed, progress=progress,
    )
    return run_finetune(ft)


def evaluate_model(model, tokenizer, harmful_prompts: Sequence[str], everyday: Sequence[str],
                   task_rows: Sequence[dict] | None, config: QuickstartConfig, out_json: Path, *,
                   progress: bool = True) -> dict[str, Any]:
    """Harmful score, share of everyday prompts answered and task accuracy (skipped when ``task_rows``
    is None) of a loaded model; write the report + responses to ``out_json``; return the report
    (``task_correct`` holds the per-row 0/1 for paired comparisons)."""
    generation = {"max_new_tokens": config.harmful_new_tokens, "batch_size": config.batch_size, "progress": progress}
    score, h_resp, h_refused = harmful_score(model, tokenizer, list(harmful_prompts), **generation)
    answered, e_resp, e_refused = answered_fraction(model, tokenizer, list(everyday), desc="everyday prompts",
                                                    **generation)
    report = {"harmful_score": round(score, 6), "answers_everyday": round(answered, 6), "task_accuracy": None,
              "n_harmful": len(harmful_prompts), "n_everyday": len(everyday), "n_task": 0}
    details = {"harmful": [{"prompt": p, "response": r, "refused": f} for p, r, f in zip(harmful_prompts, h_resp, h_refused)],
               "everyday": [{"prompt": p, "response": r, "refused": f} for p, r, f in zip(everyday, e_resp, e_refused)]}
    if task_rows is not None:
        accuracy, t_resp, correct = task_accuracy(model, tokenizer, list(task_rows), max_new_tokens=config.task_new_tokens,
                                                  batch_size=config.batch_size, progress=progress)
        report.update(task_accuracy=round(accuracy, 6), n_task=len(task_rows), task_correct=[int(c) for c in correct])
        details["task"] = [{**row, "response": r, "correct": c} for row, r, c in zip(task_rows, t_resp, correct)]
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps({**{k: v for k, v in report.items() if k != "task_correct"}, **details},
                                   indent=2, ensure_ascii=False) + "\n")
    return report


# --------------------------------------------------------------------------------------------
# Stage 7: report
# --------------------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def format_table(summary: dict[str, Any], counts: dict[str, int]) -> str:
    """Return the results table (Markdown) from a summary dict and the filter's row counts."""
    f = summary["filter"]
    lines = [
        (f"Filter: {counts['flagged']} of {counts['rows']} rows flagged ({counts['harmful']} known harmful): "
         f"precision {_pct(f['precision'])}, recall {_pct(f['recall'])}"),
        "",
        "| model | harmful score (lower is safer) | answers everyday prompts | task accuracy |",
        "|---|---|---|---|",
    ]
    for key in MODELS:
        row = summary[key]
        task = "–" if row["task_accuracy"] is None else _pct(row["task_accuracy"])
        lines.append(f"| {MODEL_LABELS[key]} | {_pct(row['harmful_score'])} | {_pct(row['answers_everyday'])} | {task} |")
    diff = summary.get("task_difference")
    if diff:
        lines += ["", (f"Task accuracy (a) - (b): {100 * diff['sft_minus_reft']:+.1f} points, paired standard "
                       f"error {100 * diff['standard_error']:.1f} ({diff['n']} test rows)")]
    return "\n".join(lines)


MODEL_LABELS = {"untouched": "untouched", "teacher": "teacher", "sft": "(a) SFT on raw data",
                "reft": "(b) ReFT (filter + distill)"}


def plot_results(summary: dict[str, Any], path: Path) -> Path:
    """Write a grouped bar chart (PNG) of harmful score, everyday prompts answered and task accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["untouched", "teacher", "(a) SFT", "(b) ReFT"]
    series = [("harmful score", "harmful_score", "#c0392b"), ("answers everyday prompts", "answers_everyday", "#27ae60"),
              (f"task accuracy ({summary['task']})", "task_accuracy", "#2e86c1")]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    width = 0.27
    for i, (name, key, colour) in enumerate(series):
        xs = [x for x, k in enumerate(MODELS) if summary[k][key] is not None]
        values = [100 * summary[MODELS[x]][key] for x in xs]
        bars = ax.bar([x + (i - 1) * width for x in xs], values, width, label=name, color=colour)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(list(range(len(MODELS))), labels)
    ax.set_ylabel("%")
    ax.set_ylim(0, 130)
    ax.legend(loc="upper center", fontsize=8, ncol=3)
    ax.set_title("refteacher quickstart")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def run_quickstart(
    out_dir: str | Path = DEFAULT_OUT_DIR,
    config: QuickstartConfig | None = None,
    *,
    model: str | None = None,
    teacher: str | Path | None = None,
    threshold: float | None = None,
    threads: int | None = None,
    progress: bool = True,
    quiet: bool = False,
) -> dict[str, Any]:
    """Run the whole quickstart into ``out_dir``; return the summary dict (also written as summary.json).

    ``model`` defaults to the built-in model; ``teacher`` to the cached default teacher (built on
    first use); ``threshold`` overrides the teacher's calibrated one. ``threads`` sets torch's CPU
    threads. ``quiet`` silences the stage lines and the table.
    """
    config = config or QuickstartConfig()
    config.check()
    model = str(model or DEFAULT_MODEL)
    if threads is not None:
        if threads < 1:
            raise UserError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clock = StageClock(STAGES, quiet=quiet)
    bars = progress and not quiet

    build_harmful, build_harmless, test_records = default_records(TEST_FRACTION, config.seed)
    with clock.stage("teacher"):
        if teacher is None:
            teacher_path, reused = ensure_default_teacher(model, build_harmful, build_harmless, seed=config.seed,
                                                          progress=bars)
            clock.note(("reused cached teacher " if reused else "built teacher ") + str(teacher_path))
        else:
            teacher_path = Path(teacher)
            clock.note(f"using teacher {teacher_path}")

    with clock.stage("user dataset (task rows + harmful rows with compliant answers) and alignment data"):
        n_harmful = config.harmful_rows
        prompts = split_harmful(build_harmful, test_records, config)
        everyday = everyday_prompts(config)
        base, tokenizer = load_model(model), load_tokenizer(model)
        model_hash = model_fingerprint(model)
        harmful_rows = compliant_rows(base, tokenizer, prompts.data, n_harmful, model_hash=model_hash,
                                      max_new_tokens=config.compliant_new_tokens, batch_size=config.batch_size,
                                      progress=bars)
        if not harmful_rows:
            raise UserError("the untouched model refused every harmful prompt; no harmful rows to mix in")
        helpful_answers = cached_answers(base, tokenizer, everyday.align, model_hash=model_hash,
                                         max_new_tokens=HELPFUL_ANSWER_TOKENS, batch_size=config.batch_size,
                                         progress=bars)
        align = alignment_rows(prompts.align, everyday.align, helpful_answers, seed=config.seed)
        task_train = make_rows(config.task, "train", config.task_rows, seed=config.seed)
        task_test = make_rows(config.task, "test", config.eval_task, seed=config.seed)
        dataset = build_dataset(task_train, harmful_rows, config.seed)
        dataset_path = write_jsonl(out / "data" / "dataset.jsonl", dataset)
        align_path = write_jsonl(out / "data" / "align.jsonl", align)
        write_jsonl(out / "data" / "eval_harmful.jsonl", [{"prompt": p} for p in prompts.eval])
        write_jsonl(out / "data" / "eval_everyday.jsonl", [{"prompt": p} for p in everyday.eval])
        write_jsonl(out / "data" / "eval_task.jsonl", task_test)
        n_helpful = sum(row["kind"] == "helpful" for row in align)
        clock.note(f"{len(dataset)} rows ({len(harmful_rows)} harmful = {len(harmful_rows) / len(dataset):.0%}); "
                   f"alignment: {len(align) - n_helpful} refusals + {n_helpful} helpful answers; eval: "
                   f"{len(prompts.eval)} harmful + {len(everyday.eval)} everyday + {len(task_test)} task")

    evals: dict[str, dict[str, Any]] = {}
    with clock.stage("evaluate the untouched model"):
        evals["untouched"] = evaluate_model(base, tokenizer, prompts.eval, everyday.eval, task_test, config,
                                            out / "eval" / "untouched.json", progress=bars)
        clock.note(_eval_line(evals["untouched"]))
    del base
    gc.collect()

    with clock.stage("filter the user dataset with the teacher, and evaluate the teacher"):
        loaded = load_teacher(teacher_path)
        filter_dir = out / "filter"
        report = run_filter(loaded, open_source(dataset_path), filter_dir, FilterOptions(threshold=threshold),
                            overwrite=True, progress=bars)
        quality = filter_quality(filter_dir, report["threshold"])
        counts = {"rows": len(dataset), "harmful": len(harmful_rows), "flagged": report["counts"]["flagged"]}
        clock.note(f"{counts['flagged']} of {len(dataset)} rows flagged; precision {_pct(quality['precision'])}, "
                   f"recall {_pct(quality['recall'])}")
        evals["teacher"] = evaluate_model(loaded.model, loaded.tokenizer, prompts.eval, everyday.eval, None, config,
                                          out / "eval" / "teacher.json", progress=bars)
        clock.note("teacher: " + _eval_line(evals["teacher"]))
        del loaded
        gc.collect()
        if report["counts"]["kept"] == 0:
            raise UserError(f"the filter flagged every row (threshold {report['threshold']:.3f}); nothing is left "
                            "to finetune on: pass a higher --threshold or check the teacher")

    adapters: dict[str, str] = {}
    with clock.stage(f"finetune (a) SFT on the raw dataset ({config.steps} steps)"):
        summary_sft = finetune(out / "finetune" / "sft", model=model, data=dataset_path, config=config, progress=bars)
        adapters["sft"] = summary_sft["adapter"]
        clock.note(f"final loss {summary_sft['final']}")
    with clock.stage(f"finetune (b) ReFT: kept rows + distillation ({config.steps} steps)"):
        summary_reft = finetune(out / "finetune" / "reft", model=model, data=filter_dir / "kept.jsonl", config=config,
                                teacher=teacher_path, align=align_path, progress=bars)
        adapters["reft"] = summary_reft["adapter"]
        clock.note(f"final loss {summary_reft['final']}")

    for name in ("sft", "reft"):
        evals[name] = _evaluate_adapter(model, adapters[name], prompts.eval, everyday.eval, task_test, config, out,
                                        bars, clock)

    gap = paired_difference(evals["sft"]["task_correct"], evals["reft"]["task_correct"])
    summary = {
        "filter": {"precision": quality["precision"], "recall": quality["recall"]},
        **{name: _figures(evals[name]) for name in MODELS},
        "task_difference": {"sft_minus_reft": round(gap.difference, 6), "standard_error": round(gap.standard_error, 6),
                            "n": gap.n},
        "student_adapters": adapters,
        "task": config.task,
    }
    table = format_table(summary, counts)
    plot_results(summary, out / "results.png")
    (out / "table.md").write_text(table + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    details = {"settings": asdict(config), "model": model, "teacher": str(teacher_path), "filter": quality,
               "filter_counts": counts, "stage_seconds": clock.seconds,
               "total_seconds": round(time.perf_counter() - clock.started, 1),
               "torch_threads": torch.get_num_threads(),
               "finetune_seconds": {"sft": summary_sft["seconds"], "reft": summary_reft["seconds"]}}
    (out / RUN_FILE).write_text(json.dumps(details, indent=2) + "\n")
    if not quiet:
        print()
        print(table)
        print(f"\nwall time {details['total_seconds']:.0f} s; everything is under {out} (summary.json, results.png)")
    return summary


def _figures(report: dict[str, Any]) -> dict[str, float | None]:
    return {key: report[key] for key in ("harmful_score", "answers_everyday", "task_accuracy")}


def _eval_line(report: dict[str, Any]) -> str:
    line = (f"harmful score {_pct(report['harmful_score'])} (n={report['n_harmful']}), "
            f"answers everyday prompts {_pct(report['answers_everyday'])} (n={report['n_everyday']})")
    if report["task_accuracy"] is not None:
        line += f", task accuracy {_pct(report['task_accuracy'])} (n={report['n_task']})"
    return line


def _evaluate_adapter(model: str, adapter: str, harmful: Sequence[str], everyday: Sequence[str],
                      task_rows: Sequence[dict], config: QuickstartConfig, out: Path, bars: bool,
                      clock: StageClock) -> dict[str, Any]:
    """Load ``model`` with the LoRA ``adapter`` merged and evaluate it as one stage; return its report."""
    name = Path(adapter).parent.name
    with clock.stage(f"evaluate ({'a' if name == 'sft' else 'b'}) {name}"):
        student, tokenizer = load_for_eval(model, adapter)
        report = evaluate_model(student, tokenizer, harmful, everyday, task_rows, config, out / "eval" / f"{name}.json",
                                progress=bars)
        clock.note(_eval_line(report))
    del student
    gc.collect()
    return report


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def add_cli(subparsers) -> None:
    """Register ``refteacher quickstart``."""
    d = QuickstartConfig()
    p = subparsers.add_parser(
        "quickstart",
        help="end to end on CPU: teacher, poisoned task data, filter, SFT vs ReFT finetune, eval table",
        description=(
            "The whole method in one command. On 2 idle CPU cores the first run takes about 20 minutes, "
            "10 of them to build the default teacher; later runs reuse it from $REFTEACHER_CACHE/teachers "
            "and take about 9. Builds the "
            "default teacher; writes a user dataset for the task (train split) in which "
            f"{d.harmful_fraction:.0%} of the rows are held-in harmful prompts answered compliantly by "
            "the untouched model; filters it with the teacher; finetunes the student (a) plainly on the "
            "raw data and (b) with ReFT (kept rows + distillation on alignment data); evaluates the "
            "untouched model, the teacher, (a) and (b): harmful score on held-out AdvBench/HarmBench prompts, "
            "the share of held-out everyday prompts answered (refusing harmless use counts against a model) and "
            "task accuracy on the task's test split. Writes data/, filter/, finetune/{sft,reft}/adapter, eval/, "
            "results.png, table.md and summary.json under --out-dir."
        ),
    )
    p.add_argument("--out-dir", default=DEFAULT_OUT_DIR, help="output directory (default %(default)s)")
    p.add_argument("--model", default=None, help="student/teacher base model (default: the built-in SmolLM2-135M-Instruct)")
    p.add_argument("--teacher", default=None, help="use this teacher directory instead of the cached default teacher")
    p.add_argument("--threshold", type=float, default=None, help="filter threshold (default: the teacher's calibrated one)")
    add_config_arguments(p, QuickstartConfig)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    p.set_defaults(func=_cli_quickstart)


def _cli_quickstart(args: argparse.Namespace) -> int:
    config = config_from_args(QuickstartConfig, args)
    run_quickstart(args.out_dir, config, model=args.model, teacher=args.teacher, threshold=args.threshold, threads=args.threads,
                   progress=args.progress)
    return 0
