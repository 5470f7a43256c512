"""Task accuracy of SFT against ReFT, paired, on enough test rows to tell 2 points apart.

The quickstart evaluates 120 task rows per model, enough to show both learned the task but not to
separate them (one paired standard error of the difference is about 4-5 points there). This script
takes a finished quickstart run's two students and evaluates both on the same ``--rows`` held-out
task rows, none of them among the quickstart's own eval rows or the distillation study's choice
rows, and reports the accuracy of each, the difference and its paired standard error (the standard
deviation of the per-row differences over sqrt(n)).

    python benchmarks/task_accuracy_gap.py --run runs/quickstart    # 1400 rows, ~8 min on 2 cores
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from harness import environment, quickstart_run, write_json

from refteacher.engine.data.tasks import make_rows
from refteacher.engine.evaluation.evaluate import load_for_eval, task_accuracy
from refteacher.engine.metrics import paired_difference

RESULT = Path(__file__).parent / "results" / "task_accuracy_gap.json"
SKIP_ROWS = 240  # the quickstart's eval rows (120) and the distillation study's choice rows (120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/quickstart", help="a finished quickstart output directory")
    p.add_argument("--rows", type=int, default=1400, help="held-out task rows both students answer")
    p.add_argument("--batch-size", type=int, default=128, help="prompts per generation batch")
    p.add_argument("--out", default=str(RESULT))
    args = p.parse_args(argv)

    run = Path(args.run)
    details, config = quickstart_run(run)
    rows = make_rows(config.task, "test", SKIP_ROWS + args.rows, seed=config.seed)[SKIP_ROWS:]
    result = {"environment": environment(), "run": str(run), "task": config.task, "rows": len(rows), "models": {}}
    correct = {}
    for name in ("sft", "reft"):
        started = time.perf_counter()
        model, tokenizer = load_for_eval(details["model"], str(run / "finetune" / name / "adapter"))
        accuracy, _, flags = task_accuracy(model, tokenizer, rows, max_new_tokens=config.task_new_tokens,
                                           batch_size=args.batch_size)
        correct[name] = [int(c) for c in flags]
        result["models"][name] = {"task_accuracy": round(accuracy, 6),
                                  "seconds": round(time.perf_counter() - started, 1)}
        del model
    gap = paired_difference(correct["sft"], correct["reft"])
    both = sum(a and b for a, b in zip(correct["sft"], correct["reft"]))
    result["sft_minus_reft"] = {"difference": round(gap.difference, 6), "standard_error": round(gap.standard_error, 6),
                                "n": gap.n, "both_correct": both,
                                "only_sft": sum(a and not b for a, b in zip(correct["sft"], correct["reft"])),
                                "only_reft": sum(b and not a for a, b in zip(correct["sft"], correct["reft"]))}
    write_json(args.out, result)
    print(f"SFT {100 * result['models']['sft']['task_accuracy']:.1f}%, ReFT {100 * result['models']['reft']['task_accuracy']:.1f}% "
          f"on {gap.n} rows; SFT - ReFT {100 * gap.difference:+.1f} points, paired standard error "
          f"{100 * gap.standard_error:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
