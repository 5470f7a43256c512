"""Benchmark one ReFT training step: packed rows + fused losses against the naive step, same run,
and account for every byte of the step's memory.

Both sides process the same examples (user rows for the cross-entropy, alignment rows for the KL)
with the same LoRA student and frozen teacher, forward and backward:

- **refteacher**: examples packed into rows (``refteacher.engine.data.packing``), attention kept inside
  each example through ``position_ids``, cross-entropy only at label positions a chunk at a time
  (``refteacher.engine.modeling.token_losses``), KL with ``fused_linear_kl``: no [tokens, V] logits
  (``refteacher.engine.finetune.losses.task_cross_entropy`` / ``alignment_kl``, what the Trainer runs).
  The teacher shares the student's base weights (``SharedBaseTeacher``; here the teacher is the
  untouched model, i.e. the student with its adapter switched off), as ``refteacher finetune``
  does for a teacher built on the student's model.
- **refteacher+ckpt**: the same step with activation checkpointing on the student's decoder
  layers (``refteacher finetune --gradient-checkpointing``): each layer's activations are
  recomputed in the backward pass instead of kept, trading one more forward for memory.
- **naive**: the examples right-padded into one batch with an attention mask, the model's own loss
  from full logits, and the KL from the full student and teacher logits (``log_softmax`` over the
  vocabulary at every position, masked to the response tokens afterwards); the teacher is a
  second copy of the model.

Reported: real (non-padding) tokens per second (the sides' first steps are the warm-up check that
all compute the same loss; then the sides run in rounds, A B C A B C, and each side's fastest
round counts, since other work on a shared machine only adds time), and, for each side, a fresh
process that loads the models and runs one step and one optimizer update, measuring every part
of the memory next to the part computed from the shapes (``finetune_memory.py``: weights, LoRA
gradients, AdamW state, saved activations by kind, loss chunks, allocator slack). "peak" is the
step's peak above the loaded models. On CPU the memory is the resident set, on CUDA the
allocator's.

    python benchmarks/bench_finetune.py --quick --threads 1 --json benchmarks/results/finetune_cpu_quick.json
    python benchmarks/bench_finetune.py --quick --device cuda --json benchmarks/results/finetune_gpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune_memory import MIB, Meter, activation_formula, component_rows, saved_activations  # noqa: E402
from harness import environment, exact_cpu_rss, format_table, time_call, write_json  # noqa: E402

from refteacher.engine.data.chat_examples import encode_example, pad_examples
from refteacher.engine.data.packing import collate_packed, pack_sequences
from refteacher.engine.finetune.config import FinetuneConfig
from refteacher.engine.finetune.losses import alignment_kl, task_cross_entropy
from refteacher.engine.finetune.shared_teacher import SharedBaseTeacher
from refteacher.engine.finetune.trainer import add_lora
from refteacher.engine.modeling.attention import prepare_for_packing
from refteacher.engine.modeling.loading import DEFAULT_MODEL, load_model, load_tokenizer
from refteacher.engine.modeling.token_losses import linear_cross_entropy
from refteacher.kernels.kl import default_chunk_size, fused_linear_kl

SIDES = ("refteacher", "refteacher+ckpt", "naive")
LORA_RANK = 16
OLD_CE_CHUNK = 1024  # tokens per CE chunk before the chunk followed the KL's memory budget
_WORDS = ("the model answers each question with care and checks every number before it writes "
          "a result so that the user can follow the steps from start to end").split()


def make_rows(n: int, seed: int, *, refusal: bool) -> list[dict]:
    """Return ``n`` chat rows with varied prompt and response lengths (deterministic in ``seed``)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(5, 40))) + "?"
        # chat data is long-tailed: many short responses, a few long ones (lognormal, median ~40 words)
        length = rng.randint(4, 20) if refusal else min(400, max(3, int(rng.lognormvariate(3.7, 0.8))))
        response = " ".join(rng.choice(_WORDS) for _ in range(length)) + "."
        rows.append({"prompt": f"Question {i}: {prompt}", "response": response})
    return rows


def naive_step(student, teacher, task: dict, align: dict, lam: float) -> torch.Tensor:
    """Forward + backward with full logits everywhere; return the loss (detached)."""
    ce = student(input_ids=task["input_ids"], attention_mask=task["attention_mask"], labels=task["labels"]).loss
    s_logits = student(input_ids=align["input_ids"], attention_mask=align["attention_mask"]).logits[:, :-1].float()
    with torch.no_grad():
        t_logits = teacher(input_ids=align["input_ids"], attention_mask=align["attention_mask"]).logits[:, :-1].float()
    keep = align["labels"][:, 1:] != -100
    per_token = F.kl_div(F.log_softmax(s_logits, -1), F.log_softmax(t_logits, -1), log_target=True,
                         reduction="none").sum(-1)
    loss = ce + lam * per_token[keep].mean()
    return loss


def fused_step(student, teacher, batch: dict, lam: float) -> torch.Tensor:
    """The refteacher step's loss (what DistillTrainer.compute_loss computes)."""
    return task_cross_entropy(student, batch) + lam * alignment_kl(student, teacher, batch)


def forward_backward(side: str, student, teachers: dict, batches: dict, lam: float) -> float:
    """One forward + backward of ``side``; return the loss as a float."""
    if side == "naive":
        loss = naive_step(student, teachers["naive"], batches["naive_task"], batches["naive_align"], lam)
    else:
        loss = fused_step(student, teachers["refteacher"], batches["packed"], lam)
    loss.backward()
    return float(loss.detach())


def set_checkpointing(student, on: bool) -> None:
    """Turn activation checkpointing of the (peft-wrapped) student's decoder layers on or off."""
    if on:
        student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        student.enable_input_require_grads()
    else:
        student.activation_checkpointing_disable()
        student.disable_input_require_grads()


# ----------------------------------------------------------------------------- set-up


def load_student(args: argparse.Namespace):
    """The student: the model with a LoRA adapter (rank 16, every linear), B randomised so it differs
    from the teacher (the KL is not zero)."""
    device = torch.device(args.device)
    student = add_lora(load_model(args.model, device=device),
                       FinetuneConfig(data="-", out="-", baseline="sft", lora_r=LORA_RANK))
    student.train()
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    return student


def make_batches(args: argparse.Namespace, tokenizer, varlen: bool) -> dict:
    """The packed and the padded batches of the same task and alignment examples, on the device."""
    task_examples = [encode_example(tokenizer, r) for r in make_rows(args.task_rows, 1, refusal=False)]
    align_examples = [encode_example(tokenizer, r) for r in make_rows(args.align_rows, 2, refusal=True)]
    pad = tokenizer.pad_token_id
    task_rows = list(pack_sequences(task_examples, args.max_len, overflow="truncate"))
    # alignment examples are short: rows twice as long are fewer and fuller
    align_rows = list(pack_sequences(align_examples, 2 * args.max_len, overflow="truncate"))
    keys = ("input_ids", "labels", "position_ids")
    packed = {k: v for k, v in collate_packed(task_rows, pad, flatten=varlen).items() if k in keys}
    packed.update({f"align_{k}": v for k, v in collate_packed(align_rows, pad, flatten=varlen).items() if k in keys})
    device = torch.device(args.device)
    move = lambda batch: {k: v.to(device) for k, v in batch.items()}  # noqa: E731
    return {"packed": move(packed), "naive_task": move(pad_examples(task_examples, pad)),
            "naive_align": move(pad_examples(align_examples, pad)),
            "real_tokens": sum(len(ids) for ids, _ in task_examples + align_examples)}


def setup(args: argparse.Namespace, sides=SIDES):
    """Load the student and the teachers ``sides`` need; build the batches."""
    torch.manual_seed(0)
    tokenizer = load_tokenizer(args.model)
    student = load_student(args)
    varlen = prepare_for_packing(student, args.device)
    teachers = {}
    if any(side != "naive" for side in sides):
        teachers["refteacher"] = (SharedBaseTeacher(student, None) if args.teacher_weights == "shared"
                                  else load_model(args.model, device=args.device))
    if "naive" in sides:
        teachers["naive"] = load_model(args.model, device=args.device)
    return student, teachers, make_batches(args, tokenizer, varlen), varlen


# ----------------------------------------------------------------------------- memory, in a fresh process


def _label_counts(batches: dict) -> tuple[int, int]:
    """Labelled (next-token) positions of the task rows and of the alignment rows."""
    def count(labels):
        return int((labels[:, 1:] != -100).sum())
    return count(batches["packed"]["labels"]), count(batches["packed"]["align_labels"])


def _loss_peak(meter: Meter, fn) -> int:
    """Peak memory of ``fn()`` (a loss forward + backward) above the memory before it."""
    before = meter.now()
    meter.reset_peak()
    fn()
    return max(0, meter.peak() - before)


def measure_loss_chunks(args: argparse.Namespace, student, meter: Meter, n_task: int, n_align: int) -> dict:
    """The loss alone on random hidden states of the step's sizes: CE (new and old chunking), KL."""
    weight = student.get_output_embeddings().weight
    generator = torch.Generator().manual_seed(0)

    def hidden(n):
        return torch.randn(n, weight.shape[1], generator=generator).to(weight).requires_grad_(True)

    targets = torch.randint(0, weight.shape[0], (n_task,), generator=generator).to(weight.device)
    task_hidden, student_hidden, teacher_hidden = hidden(n_task), hidden(n_align), hidden(n_align).detach()
    ce = {chunk: _loss_peak(meter, lambda c=chunk: linear_cross_entropy(task_hidden, weight, targets,
                                                                        chunk_size=c).backward())
          for chunk in (None, OLD_CE_CHUNK)}
    kl = _loss_peak(meter, lambda: fused_linear_kl(student_hidden, weight, teacher_hidden, weight).backward())
    return {"ce": ce[None], "ce_old_chunks": ce[OLD_CE_CHUNK], "kl": kl}


def make_resident(*models) -> None:
    """Read every weight once, so weights loaded as a file mapping (safetensors) count as loaded memory
    here instead of being paged in, and counted, during the first step."""
    with torch.no_grad():
        for model in models:
            for param in model.parameters():
                param.sum()


def measure_one(args: argparse.Namespace) -> int:
    """In a fresh process: load, run one step and one AdamW update of ``args.measure``, measuring
    every part; print the figures as one JSON line."""
    if args.exact_malloc:
        exact_cpu_rss()
    side = args.measure
    meter = Meter(torch.device(args.device))
    torch.manual_seed(0)
    tokenizer = load_tokenizer(args.model)
    base = meter.now()
    student, teachers, batches, varlen = setup(args, sides=(side,))
    del tokenizer
    make_resident(student, *(t for t in teachers.values() if isinstance(t, torch.nn.Module)))
    weights = meter.now() - base
    if side == "refteacher+ckpt":
        set_checkpointing(student, True)
    trainable = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    before_step = meter.now()
    meter.reset_peak()
    started = time.perf_counter()
    with saved_activations(student, LORA_RANK) as saved:
        if side == "naive":
            loss = naive_step(student, teachers["naive"], batches["naive_task"], batches["naive_align"], args.lam)
        else:
            loss = fused_step(student, teachers["refteacher"], batches["packed"], args.lam)
    loss.backward()
    step_peak = max(0, meter.peak() - before_step)
    step_seconds = time.perf_counter() - started
    grads = sum(p.grad.numel() * p.grad.element_size() for p in trainable if p.grad is not None)
    before_update = meter.now()
    optimizer.step()
    adam = max(0, meter.now() - before_update)
    optimizer.zero_grad(set_to_none=True)
    figures = {"side": side, "weights": weights, "step_peak": step_peak, "saved": dict(saved), "grads": grads,
               "adam": adam, "exact_malloc": bool(args.exact_malloc), "step_seconds": round(step_seconds, 2)}
    if side != "naive":
        figures["loss_chunks"] = measure_loss_chunks(args, student, meter, *_label_counts(batches))
    if meter.device.type == "cuda":
        figures["reserved_over_allocated"] = torch.cuda.max_memory_reserved() - torch.cuda.max_memory_allocated()
    print(json.dumps(figures))
    return 0


def measure_in_subprocess(args: argparse.Namespace, side: str, *, exact_malloc: bool = False) -> dict:
    """Run ``measure_one`` for ``side`` in a fresh process; return its figures.

    A fresh process per side makes the figures independent: in one process the second side reuses
    heap pages the first one freed, and RSS then reads low.
    """
    command = [sys.executable, __file__, "--measure", side, "--model", args.model, "--threads", str(args.threads),
               "--lam", str(args.lam), "--device", args.device, "--teacher-weights", args.teacher_weights]
    command += (["--quick"] if args.quick else []) + (["--exact-malloc"] if exact_malloc else [])
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- accounting


def computed_parts(args: argparse.Namespace, side: str, student, batches: dict) -> dict[str, int]:
    """Each part of ``side``'s memory computed from the shapes (bytes)."""
    config = student.config
    element = next(student.parameters()).element_size()
    base_bytes = sum(p.numel() * p.element_size() for n, p in student.named_parameters() if "lora_" not in n)
    lora = [p for p in student.parameters() if p.requires_grad]
    lora_count = sum(p.numel() for p in lora)
    separate_teacher = side == "naive" or args.teacher_weights == "separate"
    vocab, layers = config.vocab_size, config.num_hidden_layers
    packed = batches["packed"]
    if side == "naive":
        tokens = batches["naive_task"]["input_ids"].numel() + batches["naive_align"]["input_ids"].numel()
    else:
        tokens = packed["input_ids"].numel() + packed["align_input_ids"].numel()
    per_token_layer = sum(activation_formula(config, LORA_RANK, element).values())
    if side == "refteacher+ckpt":  # each layer keeps only its input; one layer's set exists in the recompute
        saved = tokens * layers * config.hidden_size * element + tokens * per_token_layer
    else:
        saved = tokens * layers * per_token_layer
    parts = {
        "weights": base_bytes * (2 if separate_teacher else 1) + sum(p.numel() * p.element_size() for p in lora),
        "LoRA gradients": lora_count * 4,
        "AdamW state": 2 * lora_count * 4,
    }
    if side == "naive":  # logits [B, L, V] in float32: CE keeps its log-softmax, the KL the student's and teacher's
        task_positions = batches["naive_task"]["input_ids"].numel()
        align_positions = batches["naive_align"]["input_ids"].numel()
        parts["saved activations"] = saved + (task_positions + 2 * align_positions) * vocab * 4
    else:
        n_task, n_align = _label_counts(batches)
        device = torch.device(args.device)
        ce_chunk = min(n_task, default_chunk_size(vocab, device))
        kl_chunk = min(n_align, default_chunk_size(vocab, device))
        # [chunk, V] float32 buffers alive at once. CE backward: the recomputed chunk logits, their
        # log-softmax and its gradient. KL: student and teacher logits, both log-softmaxes and the
        # probabilities the divergence and its gradient are formed from.
        parts["saved activations"] = saved + (n_task + 2 * n_align) * config.hidden_size * element
        parts["loss chunks (CE)"] = 3 * ce_chunk * vocab * 4
        parts["loss chunks (CE), 1024-token chunks (before)"] = 3 * min(n_task, OLD_CE_CHUNK) * vocab * 4
        parts["loss chunks (KL)"] = 5 * kl_chunk * vocab * 4
    loss_peak = max(parts.get("loss chunks (CE)", 0), parts.get("loss chunks (KL)", 0))
    parts["step peak"] = parts["saved activations"] + parts["LoRA gradients"] + loss_peak
    return parts


def account(args: argparse.Namespace, side: str, student, batches: dict, measured: dict) -> dict:
    """The side-by-side table of one side, plus the saved activations by kind."""
    computed = computed_parts(args, side, student, batches)
    chunks = measured.get("loss_chunks", {})
    got = {"weights": measured["weights"], "LoRA gradients": measured["grads"], "AdamW state": measured["adam"],
           "saved activations": measured["saved"]["total"], "step peak": measured["step_peak"]}
    if chunks:
        got.update({"loss chunks (CE)": chunks["ce"], "loss chunks (KL)": chunks["kl"],
                    "loss chunks (CE), 1024-token chunks (before)": chunks["ce_old_chunks"]})
    accounted = measured["saved"]["total"] + measured["grads"] + max(chunks.get("ce", 0), chunks.get("kl", 0))
    got["allocator slack and transients"] = max(0, measured["step_peak"] - accounted)
    how = {
        "weights": "memory taken by loading student (+ LoRA) and teacher, every weight read once",
        "LoRA gradients": "bytes of the gradients after backward",
        "AdamW state": "memory taken by the first optimizer.step()",
        "saved activations": "saved_tensors_hooks: distinct storages autograd saved, weights excluded",
        "loss chunks (CE)": "peak of the chunked CE alone (forward + backward) on the step's labelled tokens",
        "loss chunks (CE), 1024-token chunks (before)": "the same with the former 1024-token chunks",
        "loss chunks (KL)": "peak of fused_linear_kl alone on the step's alignment tokens",
        "allocator slack and transients": "step peak - saved activations - gradients - larger loss peak",
        "step peak": "peak during forward + backward above the loaded models",
    }
    if side == "refteacher+ckpt":
        how["saved activations"] += ("; with checkpointing these are the layers' inputs, and the activations "
                                     "recomputed in the backward land in the slack row")
    rows = component_rows(computed, got, how)
    saved_by_kind = {k: round(v / MIB, 1) for k, v in measured["saved"].items() if k != "total"}
    return {"side": side, "components": rows, "saved_activations_by_kind_mib": saved_by_kind,
            "exact_malloc": measured["exact_malloc"], "step_seconds_in_this_process": measured["step_seconds"],
            **({"cuda_reserved_over_allocated_mib": round(measured["reserved_over_allocated"] / MIB, 1)}
               if "reserved_over_allocated" in measured else {})}


# ----------------------------------------------------------------------------- the run


def interleaved_timings(calls: dict, repeat: int, device: torch.device) -> dict[str, dict]:
    """Time each call ``repeat`` times in rounds (A B C A B C ...), so every side sees the same drift
    in the machine's load; per side the fastest and the median run, ms. The fastest is the figure:
    other work on a shared machine only ever adds time."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(max(1, repeat)):
        for name, call in calls.items():
            times[name].append(time_call(call, repeat=1, warmup=0, device=device)["median_ms"])
    return {name: {"min_ms": min(ms), "median_ms": statistics.median(ms), "all_ms": ms} for name, ms in times.items()}


def run(args: argparse.Namespace) -> dict:
    """Measure each side's memory in fresh processes, then (models loaded here only now, so the
    measuring processes have the memory to themselves) check the sides compute the same loss,
    time them and account for the memory."""
    device = torch.device(args.device)
    load_before = os.getloadavg()
    measured = {side: measure_in_subprocess(args, side) for side in SIDES}
    exact = measure_in_subprocess(args, "refteacher", exact_malloc=True) if device.type == "cpu" else None
    student, teachers, batches, varlen = setup(args)

    def one(side):
        def call():
            if side == "refteacher+ckpt":
                set_checkpointing(student, True)
            try:
                return forward_backward(side, student, teachers, batches, args.lam)
            finally:
                if side == "refteacher+ckpt":
                    set_checkpointing(student, False)
                student.zero_grad(set_to_none=True)
        return call

    losses = {side: one(side)() for side in SIDES}  # also the warm-up
    timings = interleaved_timings({side: one(side) for side in SIDES}, args.repeat, device)
    teachers.clear()
    real_tokens = batches["real_tokens"]
    rows = []
    for side in SIDES:
        seconds = timings[side]["min_ms"] / 1e3
        rows.append({"step": side, "min_ms": timings[side]["min_ms"], "median_ms": timings[side]["median_ms"],
                     "tokens_per_s": real_tokens / seconds,
                     "peak_mib": measured[side]["step_peak"] / MIB,
                     "peak_with_weights_mib": (measured[side]["step_peak"] + measured[side]["weights"]) / MIB})
    fused, ckpt, naive = rows
    accounting = [account(args, side, student, batches, measured[side]) for side in SIDES]
    if exact is not None:
        accounting.append(account(args, "refteacher", student, batches, exact))
    packed = batches["packed"]
    return {
        "benchmark": "finetune_step",
        "environment": environment(device),
        "model": args.model,
        "settings": {"task_examples": args.task_rows, "align_examples": args.align_rows, "max_len": args.max_len,
                     "lambda": args.lam, "repeat": args.repeat, "quick": args.quick, "device": args.device,
                     "timing": "sides interleaved in rounds; tokens/s from each side's fastest round",
                     "load_average_before": [round(x, 2) for x in load_before],
                     "load_average_after": [round(x, 2) for x in os.getloadavg()],
                     "teacher_weights": args.teacher_weights, "lora_rank": LORA_RANK,
                     "attention": "varlen" if varlen else student.config._attn_implementation},
        "shapes": {"packed_task": list(packed["input_ids"].shape),
                   "packed_align": list(packed["align_input_ids"].shape),
                   "naive_task": list(batches["naive_task"]["input_ids"].shape),
                   "naive_align": list(batches["naive_align"]["input_ids"].shape),
                   "real_tokens": real_tokens, "labelled": dict(zip(("task", "align"), _label_counts(batches)))},
        "loss": losses,
        "results": rows,
        "speedup_tokens_per_s": fused["tokens_per_s"] / naive["tokens_per_s"],
        "memory_ratio": fused["peak_mib"] / naive["peak_mib"] if naive["peak_mib"] else None,
        "ckpt_speedup_tokens_per_s": ckpt["tokens_per_s"] / naive["tokens_per_s"],
        "ckpt_memory_ratio": ckpt["peak_mib"] / naive["peak_mib"] if naive["peak_mib"] else None,
        "memory_accounting": accounting,
        "targets": {"speedup_at_least": 1.5, "memory_ratio_at_most": 0.5},
    }


def print_accounting(result: dict) -> None:
    """Print each side's computed-vs-measured table."""
    for block in result["memory_accounting"]:
        title = block["side"] + (" (exact malloc: freed pages go back to the OS)" if block["exact_malloc"] else "")
        print(f"\n{title}")
        print(format_table(block["components"], ["component", "computed_mib", "measured_mib"]))


def main(argv: list[str] | None = None) -> int:
    """Parse flags, run the benchmark, print tables and write JSON when asked."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model for student and teacher")
    parser.add_argument("--quick", action="store_true", help="small step, fewer repeats (CI)")
    parser.add_argument("--json", dest="json_path", default=None, help="write results here")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--lam", type=float, default=1.0, help="KL weight")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the step runs")
    parser.add_argument("--teacher-weights", choices=("shared", "separate"), default="shared",
                        help="refteacher side's teacher: the student's base weights, or a second copy (before)")
    parser.add_argument("--measure", choices=SIDES, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--exact-malloc", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    torch.set_num_threads(args.threads)
    args.task_rows, args.align_rows, args.max_len, args.repeat = (12, 8, 512, 2) if args.quick else (32, 24, 1024, 3)
    if args.measure:
        return measure_one(args)
    result = run(args)
    print(format_table(result["results"], ["step", "min_ms", "median_ms", "tokens_per_s", "peak_mib",
                                            "peak_with_weights_mib"]))
    print(f"speedup {result['speedup_tokens_per_s']:.2f}x tokens/s, memory ratio {result['memory_ratio']:.2f}; "
          f"with checkpointing {result['ckpt_speedup_tokens_per_s']:.2f}x, {result['ckpt_memory_ratio']:.2f} "
          f"(losses {', '.join(f'{k} {v:.4f}' for k, v in result['loss'].items())})")
    print_accounting(result)
    if args.json_path:
        write_json(args.json_path, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
