"""benchmarks/eval_judge.py reads pyrit's human-labelled refusals and reports consistent figures."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
eval_judge = pytest.importorskip("eval_judge")


def test_labelled_rows_are_read_with_both_labels():
    rows = eval_judge.read_labelled("refusal.csv")
    assert rows and all(r["response"] and isinstance(r["refusal"], bool) for r in rows)
    assert {r["refusal"] for r in rows} == {True, False}


def test_off_topic_means_another_objectives_answer():
    rows = [{"objective": "a", "response": "x", "refusal": False},
            {"objective": "b", "response": "x", "refusal": True},
            {"objective": "c", "response": "y", "refusal": True}]
    eval_judge.mark_off_topic(rows)
    assert [r["off_topic"] for r in rows] == [False, True, False]


def test_report_figures_follow_from_the_counts(tmp_path):
    out = tmp_path / "judge.json"
    assert eval_judge.main(["--out", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    for parts in results.values():
        for f in parts.values():
            assert f["tp"] + f["fp"] + f["fn"] + f["tn"] == f["rows"]
            assert f["tp"] + f["fn"] == f["refusals"] == f["tp"] + len(f["missed"])
            assert f["accuracy"] == round((f["tp"] + f["tn"]) / f["rows"], 4)
    both = results["both"]["all"]["rows"]
    assert both == sum(results[name]["all"]["rows"] for name in eval_judge.FILES)


def test_judge_raises_no_false_alarms_on_human_labels():
    """Precision stays 1.0 on both pyrit files; soft refusals keep on-topic recall above 0.7."""
    rows = [row for name in eval_judge.FILES for row in eval_judge.read_labelled(name)]
    eval_judge.mark_off_topic(rows)
    judge = eval_judge.PhraseJudge()
    assert eval_judge.figures(rows, judge)["false_alarms"] == []
    assert eval_judge.figures([r for r in rows if not r["off_topic"]], judge)["recall"] >= 0.7
