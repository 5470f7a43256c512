"""How far the refusal judge can be trusted: the phrase judge against human labels.

The harmful score of every model (``refteacher eval``, the quickstart) is "the fraction of harmful
prompts the judge does not call refused", so the judge's errors are the score's. This checks it on
responses the project did not write: pyrit's human-labelled refusal sets
(``pyrit/datasets/scorer_evals/refusal_scorer/``, MIT licence), where label 1 means the response
refuses its objective. Both files are scored whole; a response that answers a different question
than its objective is labelled a refusal there, which a judge that reads only the response cannot
see, so those rows are counted apart (``off_topic``: the response is, verbatim, another row's
answer to another objective, in either file).

    python benchmarks/eval_judge.py            # prints the table, writes benchmarks/results/judge_pyrit_refusal.json
"""
from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

from harness import environment, format_table, write_json

from refteacher.engine.data.prompt_sets import package_file
from refteacher.engine.judge import PhraseJudge
from refteacher.engine.metrics import confusion_counts

FILES = ("refusal.csv", "refusal_extra.csv")
FOLDER = "datasets/scorer_evals/refusal_scorer"


def read_labelled(name: str) -> list[dict]:
    """Rows ``{"objective", "response", "refusal": bool}`` of one pyrit refusal file."""
    text = package_file("pyrit", f"{FOLDER}/{name}").read_text(encoding="utf-8")
    body = "".join(line for line in text.splitlines(keepends=True) if not line.startswith("#"))
    rows = []
    for record in csv.DictReader(io.StringIO(body)):
        rows.append({"objective": record["objective"], "response": record["assistant_response"],
                     "refusal": record["human_score"].strip() == "1"})
    return rows


def mark_off_topic(rows: list[dict]) -> None:
    """Set ``off_topic`` where a row's response is another row's response to another objective."""
    answered = {}
    for row in rows:
        answered.setdefault(row["response"].strip(), set()).add(row["objective"])
    for row in rows:
        others = answered[row["response"].strip()] - {row["objective"]}
        row["off_topic"] = bool(others) and row["refusal"]


def figures(rows: list[dict], judge) -> dict:
    """Accuracy, precision, recall (refusal is the positive class) and the confusion counts."""
    predicted = [bool(judge.is_refusal(r["response"])) for r in rows]
    counts = confusion_counts([float(p) for p in predicted], [r["refusal"] for r in rows], 0.5)
    tp, fp, fn, tn = counts["tp"], counts["fp"], counts["fn"], counts["tn"]
    return {
        "rows": len(rows), "refusals": tp + fn,
        "accuracy": round((tp + tn) / max(1, len(rows)), 4),
        "precision": round(tp / max(1, tp + fp), 4), "recall": round(tp / max(1, tp + fn), 4),
        "tp": tp, "fp": fp, "fn": fn, "tn": tn,
        "missed": [r["response"][:160] for r, p in zip(rows, predicted) if r["refusal"] and not p],
        "false_alarms": [r["response"][:160] for r, p in zip(rows, predicted) if p and not r["refusal"]],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "judge_pyrit_refusal.json"))
    args = parser.parse_args(argv)
    judge = PhraseJudge()
    results, table = {}, []
    every = []
    by_file = {name: read_labelled(name) for name in FILES}
    mark_off_topic([row for rows in by_file.values() for row in rows])  # answers recur across the files
    for name, rows in by_file.items():
        every += rows
        on_topic = [r for r in rows if not r["off_topic"]]
        results[name] = {"all": figures(rows, judge), "on_topic": figures(on_topic, judge)}
    results["both"] = {"all": figures(every, judge), "on_topic": figures([r for r in every if not r["off_topic"]], judge)}
    for name, parts in results.items():
        for part, f in parts.items():
            table.append({"file": name, "rows": part, "n": f["rows"], "refusals": f["refusals"],
                          "accuracy": f["accuracy"], "precision": f["precision"], "recall": f["recall"]})
    print(format_table(table, ["file", "rows", "n", "refusals", "accuracy", "precision", "recall"]))
    write_json(args.out, {"judge": judge.name, "results": results, "environment": environment()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
