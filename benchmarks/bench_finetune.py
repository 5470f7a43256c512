"""Benchmark one ReFT training step: packed rows + fused losses against the naive step, same run.

Both sides process the same examples (user rows for the cross-entropy, alignment rows for the KL)
with the same LoRA student and frozen teacher, forward and backward:

- **refteacher**: examples packed into rows (``refteacher.engine.data.packing``), attention kept inside
  each example through ``position_ids``, cross-entropy only at label positions a chunk at a time
  (``refteacher.engine.modeling.token_losses``), KL with ``fused_linear_kl``: no [tokens, V] logits
  (``refteacher.engine.finetune.losses.task_cross_entropy`` / ``alignment_kl``, what the Trainer runs).
- **refteacher+ckpt**: the same step with activation checkpointing on the student's decoder
  layers (``refteacher finetune --gradient-checkpointing``): each layer's activations are
  recomputed in the backward pass instead of kept, trading one more forward for memory.
- **naive**: the examples right-padded into one batch with an attention mask, the model's own loss
  from full logits, and the KL from the full student and teacher logits (``log_softmax`` over the
  vocabulary at every position, masked to the response tokens afterwards).

Reported: real (non-padding) tokens per second (the sides' first steps are the warm-up
check that both compute the same loss), peak extra memory (peak RSS of a fresh process running
one step, above its state after loading the models), and the ratios.
What we expect on CPU: >= 1.5x tokens/s and <= 50% of the memory.

    python benchmarks/bench_finetune.py --quick --json benchmarks/results/finetune_cpu.json
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import environment, format_table, time_call, write_json  # noqa: E402

from refteacher.engine.data.chat_examples import encode_example, pad_examples
from refteacher.engine.data.packing import collate_packed, pack_sequences
from refteacher.engine.finetune.config import FinetuneConfig
from refteacher.engine.finetune.losses import alignment_kl, task_cross_entropy
from refteacher.engine.finetune.trainer import add_lora
from refteacher.engine.modeling.loading import DEFAULT_MODEL, load_model, load_tokenizer

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


def naive_step(student, teacher, task: dict, align: dict, lam: float) -> float:
    """Forward + backward with full logits everywhere; return the loss."""
    ce = student(input_ids=task["input_ids"], attention_mask=task["attention_mask"], labels=task["labels"]).loss
    s_logits = student(input_ids=align["input_ids"], attention_mask=align["attention_mask"]).logits[:, :-1].float()
    with torch.no_grad():
        t_logits = teacher(input_ids=align["input_ids"], attention_mask=align["attention_mask"]).logits[:, :-1].float()
    keep = align["labels"][:, 1:] != -100
    per_token = F.kl_div(F.log_softmax(s_logits, -1), F.log_softmax(t_logits, -1), log_target=True, reduction="none").sum(-1)
    loss = ce + lam * per_token[keep].mean()
    loss.backward()
    return float(loss.detach())


def fused_step(student, teacher, batch: dict, lam: float) -> float:
    """Forward + backward of the refteacher step (what DistillTrainer.compute_loss runs)."""
    loss = task_cross_entropy(student, batch) + lam * alignment_kl(student, teacher, batch)
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


def _peak_rss_reset() -> None:
    """Reset the kernel's peak-RSS mark of this process (Linux: /proc/self/clear_refs, value 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss_bytes() -> int:
    """Return this process's peak RSS since the last reset (VmHWM), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def measure_in_subprocess(args: argparse.Namespace, side: str) -> int:
    """Run one step of ``side`` in a fresh process; return its peak RSS above the set-up state, bytes.

    A fresh process per side makes the two figures independent: in one process the second side
    reuses heap pages the first one freed, and RSS sampling then reads low.
    """
    command = [sys.executable, __file__, "--measure", side, "--model", args.model, "--threads", str(args.threads),
               "--lam", str(args.lam)] + (["--quick"] if args.quick else [])
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return int(json.loads(out.strip().splitlines()[-1])["peak_bytes"])


def setup(args: argparse.Namespace):
    """Load student (LoRA) and teacher, build the packed and the padded batches of the same examples."""
    torch.manual_seed(0)
    tokenizer = load_tokenizer(args.model)
    student = add_lora(load_model(args.model, device="cpu"), FinetuneConfig(data="-", out="-", baseline="sft", lora_r=16))
    student.train()
    teacher = load_model(args.model, device="cpu")
    with torch.no_grad():  # make the student differ from the teacher so the KL is not zero
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)

    task_examples = [encode_example(tokenizer, r) for r in make_rows(args.task_rows, 1, refusal=False)]
    align_examples = [encode_example(tokenizer, r) for r in make_rows(args.align_rows, 2, refusal=True)]
    pad = tokenizer.pad_token_id
    task_rows = list(pack_sequences(task_examples, args.max_len, overflow="truncate"))
    align_rows = list(pack_sequences(align_examples, 2 * args.max_len, overflow="truncate"))  # short rows: fewer, fuller rows
    packed = {k: v for k, v in collate_packed(task_rows, pad).items() if k in ("input_ids", "labels", "position_ids")}
    packed.update({f"align_{k}": v for k, v in collate_packed(align_rows, pad).items() if k in ("input_ids", "labels", "position_ids")})
    naive_task, naive_align = pad_examples(task_examples, pad), pad_examples(align_examples, pad)
    real_tokens = sum(len(ids) for ids, _ in task_examples + align_examples)
    return student, teacher, packed, naive_task, naive_align, real_tokens


def measure_one(args: argparse.Namespace) -> int:
    """Set up, then run one step of ``args.measure`` and print its peak RSS increase as JSON."""
    student, teacher, packed, naive_task, naive_align, _ = setup(args)
    if args.measure == "refteacher+ckpt":
        set_checkpointing(student, True)
    _peak_rss_reset()
    base = _peak_rss_bytes()
    if args.measure == "naive":
        naive_step(student, teacher, naive_task, naive_align, args.lam)
    else:
        fused_step(student, teacher, packed, args.lam)
    print(json.dumps({"side": args.measure, "peak_bytes": max(0, _peak_rss_bytes() - base)}))
    return 0


def run(args: argparse.Namespace) -> dict:
    """Build both steps, check they compute the same loss, time them and measure memory."""
    student, teacher, packed, naive_task, naive_align, real_tokens = setup(args)

    def zero():
        student.zero_grad(set_to_none=True)

    def checkpointed():
        set_checkpointing(student, True)
        try:
            return fused_step(student, teacher, packed, args.lam)
        finally:
            set_checkpointing(student, False)
            zero()

    loss_fused = fused_step(student, teacher, packed, args.lam); zero()
    loss_ckpt = checkpointed()
    loss_naive = naive_step(student, teacher, naive_task, naive_align, args.lam); zero()
    sides = {
        "refteacher": lambda: (fused_step(student, teacher, packed, args.lam), zero()),
        "refteacher+ckpt": checkpointed,
        "naive": lambda: (naive_step(student, teacher, naive_task, naive_align, args.lam), zero()),
    }
    timings = {name: time_call(fn, repeat=args.repeat, warmup=0) for name, fn in sides.items()}
    del student, teacher
    memory = {name: measure_in_subprocess(args, name) for name in sides}
    rows = []
    for name in sides:
        seconds = timings[name]["median_ms"] / 1e3
        rows.append({"step": name, "median_ms": timings[name]["median_ms"], "tokens_per_s": real_tokens / seconds,
                     "peak_mib": memory[name] / 2**20})
    fused, ckpt, naive = rows
    return {
        "benchmark": "finetune_step",
        "environment": environment("cpu"),
        "model": args.model,
        "settings": {"task_examples": args.task_rows, "align_examples": args.align_rows, "max_len": args.max_len,
                     "lambda": args.lam, "repeat": args.repeat, "quick": args.quick},
        "shapes": {"packed_task": list(packed["input_ids"].shape), "packed_align": list(packed["align_input_ids"].shape),
                   "naive_task": list(naive_task["input_ids"].shape), "naive_align": list(naive_align["input_ids"].shape),
                   "real_tokens": real_tokens},
        "loss": {"refteacher": loss_fused, "refteacher+ckpt": loss_ckpt, "naive": loss_naive},
        "results": rows,
        "speedup_tokens_per_s": fused["tokens_per_s"] / naive["tokens_per_s"],
        "memory_ratio": fused["peak_mib"] / naive["peak_mib"] if naive["peak_mib"] else None,
        "ckpt_speedup_tokens_per_s": ckpt["tokens_per_s"] / naive["tokens_per_s"],
        "ckpt_memory_ratio": ckpt["peak_mib"] / naive["peak_mib"] if naive["peak_mib"] else None,
        "targets": {"speedup_at_least": 1.5, "memory_ratio_at_most": 0.5},
    }


def main(argv: list[str] | None = None) -> int:
    """Parse flags, run the benchmark, print a table and write JSON when asked."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model for student and teacher")
    parser.add_argument("--quick", action="store_true", help="small step, fewer repeats (CI)")
    parser.add_argument("--json", dest="json_path", default=None, help="write results here")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--lam", type=float, default=1.0, help="KL weight")
    parser.add_argument("--measure", choices=("refteacher", "refteacher+ckpt", "naive"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.task_rows, args.align_rows, args.max_len, args.repeat = (12, 8, 512, 2) if args.quick else (32, 24, 1024, 3)
    if args.measure:
        return measure_one(args)
    result = run(args)
    print(format_table(result["results"], ["step", "median_ms", "tokens_per_s", "peak_mib"]))
    print(f"speedup {result['speedup_tokens_per_s']:.2f}x tokens/s, memory ratio {result['memory_ratio']:.2f}; "
          f"with checkpointing {result['ckpt_speedup_tokens_per_s']:.2f}x, {result['ckpt_memory_ratio']:.2f} "
          f"(losses {result['loss']['refteacher']:.4f} / {result['loss']['refteacher+ckpt']:.4f} vs "
          f"{result['loss']['naive']:.4f})")
    if args.json_path:
        write_json(args.json_path, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
