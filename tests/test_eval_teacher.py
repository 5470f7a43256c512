"""benchmarks/eval_teacher.py end to end on the tiny model: one left-out fold, a 4-step teacher."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "eval_teacher.py"


@pytest.fixture(scope="module")
def eval_teacher():
    spec = importlib.util.spec_from_file_location("eval_teacher", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_left_out_fold_reports_both_filters(eval_teacher, tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("REFTEACHER_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "result.json"
    assert eval_teacher.main(["--model", str(tiny_model_dir), "--quick", "--folds", "no_matched", "--threads", "1",
                              "--set", "layer=2", "--set", "max_steps=2", "--work", str(tmp_path / "work"),
                              "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["config"]["layer"] == 2 and result["config"]["max_steps"] == 2  # --set wins over --quick
    (fold,) = result["folds"]
    assert fold["fold"] == "no_matched" and fold["test"]["harmful"] == fold["test"]["harmless"] > 0
    for name in ("baseline", "teacher"):
        figures = fold[name]
        assert all(0.0 <= figures[key] <= 1.0 for key in ("auroc", "recall", "fpr_edgy", "fpr_test_harmless"))
    assert fold["teacher"]["calibration"]["rule"] == "fpr"
    assert 0.0 <= fold["teacher"]["refusal_rate_harmful"] <= 1.0
    assert len(fold["teacher"]["samples"]["harmful"]) == 3
    assert "| no_matched | ReFT teacher |" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--set", "layer"], "--set takes KEY=VALUE"),
    (["--set", "no_such_field=1"], "no field 'no_such_field'"),
    (["--set", "max_steps=many"], "not a valid int"),
    (["--folds", "in_dist,no_matched", "--teacher", "somewhere"], "exactly one --folds"),
])
def test_bad_arguments_exit_with_a_message(eval_teacher, argv, message):
    with pytest.raises(SystemExit, match=message):
        eval_teacher.main(argv)
