"""benchmarks/eval_teacher.py and threshold_rules.py end to end on the tiny model: one left-out
fold, a 2-step teacher, then its threshold rules."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from refteacher.engine.teacher.config import TAXONOMY_DEFAULTS

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name):
    sys.path.insert(0, str(BENCHMARKS))  # the scripts import their neighbours (harness, eval_teacher)
    try:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.fixture(scope="module")
def eval_teacher():
    return _script("eval_teacher")


@pytest.fixture(scope="module")
def fold_run(eval_teacher, tiny_model_dir, tmp_path_factory):
    """(result JSON, teacher folder) of eval_teacher on the no_matched fold with the tiny model."""
    tmp = tmp_path_factory.mktemp("eval_teacher")
    patch = pytest.MonkeyPatch()
    patch.setenv("REFTEACHER_CACHE", str(tmp / "cache"))
    try:
        out = tmp / "result.json"
        assert eval_teacher.main(["--model", str(tiny_model_dir), "--quick", "--folds", "no_matched", "--threads", "1",
                                  "--set", "layer=2", "--set", "max_steps=2", "--work", str(tmp / "work"),
                                  "--json", str(out)]) == 0
        yield json.loads(out.read_text()), tmp / "work" / "teacher-no_matched-0"
    finally:
        patch.undo()


def test_a_left_out_fold_reports_both_filters(fold_run):
    result, _ = fold_run
    assert result["config"]["layer"] == 2 and result["config"]["max_steps"] == 2  # --set wins over --quick
    (fold,) = result["folds"]
    assert fold["fold"] == "no_matched" and fold["test"]["harmful"] == fold["test"]["harmless"] > 0
    for name in ("baseline", "teacher"):
        figures = fold[name]
        assert all(0.0 <= figures[key] <= 1.0 for key in ("auroc", "recall", "fpr_edgy", "fpr_test_harmless"))
    assert fold["teacher"]["calibration"]["rule"] == "fpr"
    assert 0.0 <= fold["teacher"]["refusal_rate_harmful"] <= 1.0
    assert len(fold["teacher"]["samples"]["harmful"]) == 3


def test_a_built_teacher_is_evaluated_with_its_own_model_and_config(eval_teacher, fold_run, tmp_path, monkeypatch):
    result, teacher = fold_run
    monkeypatch.setenv("REFTEACHER_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "again.json"
    # no --model: the teacher's manifest names the tiny model, and its config (layer 2) calibrates the baseline
    assert eval_teacher.main(["--teacher", str(teacher), "--folds", "no_matched", "--generate", "8",
                              "--threads", "1", "--json", str(out)]) == 0
    again = json.loads(out.read_text())
    assert again["config"] == result["config"] and again["model"] == result["model"]
    for name in ("baseline", "teacher"):
        for key in ("auroc", "recall", "fpr_edgy", "threshold"):
            assert again["folds"][0][name][key] == pytest.approx(result["folds"][0][name][key], abs=1e-6), (name, key)


def test_threshold_rules_rebuild_the_teachers_own_threshold(fold_run, tmp_path):
    result, teacher = fold_run
    out = tmp_path / "rules.json"
    config = result["config"]
    gap = config["threshold_gap"]
    assert _script("threshold_rules").main([f"no_matched={teacher}", "--gaps", f"none,{gap},0.5", "--json", str(out)]) == 0
    rows = {row["gap"]: row for row in json.loads(out.read_text())["rows"]}
    # the calibration split is rebuilt from the manifest, so the build's own gap gives its saved threshold
    saved = result["folds"][0]["teacher"]["threshold"]
    assert rows[gap]["threshold"] == pytest.approx(saved, abs=1e-6)
    assert rows[gap]["recall"] == pytest.approx(result["folds"][0]["teacher"]["recall"])
    assert rows[0.5]["threshold"] == max(rows["none"]["threshold"], config["margin"] + 0.5)
    assert rows[0.5]["recall"] <= rows["none"]["recall"]


@pytest.mark.parametrize("argv, message", [
    (["--set", "layer"], "--set takes KEY=VALUE"),
    (["--set", "no_such_field=1"], "no field 'no_such_field'"),
    (["--set", "max_steps=many"], "not a valid int"),
    (["--folds", "in_dist,no_matched", "--teacher", "somewhere"], "exactly one --folds"),
    (["--folds", "in_dist", "--teacher", "somewhere", "--seed", "1"], "drop --set, --seed and --quick"),
    (["--folds", "in_dist", "--teacher", "somewhere", "--seed", "0"], "drop --set, --seed and --quick"),
    (["--folds", "in_dist", "--teacher", "/no/such/teacher"], "not a teacher directory"),
    (["--folds", "in_dist,no:hate"], "category folds build on the --taxonomy sets and settings"),
])
def test_bad_eval_teacher_arguments_exit_with_a_message(eval_teacher, argv, message):
    with pytest.raises(SystemExit, match=message):
        eval_teacher.main(argv)


@pytest.mark.parametrize("argv, message", [
    (["no_matched"], "expected FOLD=TEACHER_DIR"),
    (["elsewhere=."], "expected FOLD=TEACHER_DIR"),
    (["no_matched=/no/such/dir"], "expected FOLD=TEACHER_DIR"),
    (["no_matched=.", "--gaps", "0,high"], "--gaps takes numbers"),
    (["no:no_such_category=."], "expected FOLD=TEACHER_DIR"),
    (["no_matched=.", "--targets", "fpr=2"], "--targets takes build"),
    (["no_matched=.", "--targets", "fpr"], "--targets takes build"),
    (["no_matched=.", "--dev", "hate"], "no teacher given: no:hate"),
    (["no_matched=.", "--dev", "no_matched"], "leave some to report"),
])
def test_bad_threshold_rules_arguments_exit_with_a_message(argv, message):
    with pytest.raises(SystemExit, match=message):
        _script("threshold_rules").main(argv)


@pytest.fixture(scope="module")
def category_run(eval_teacher, tiny_model_dir, tmp_path_factory):
    """(result JSON, work folder) of eval_teacher on two category folds, seeds 0 and 1, with a
    1-step teacher on each fold at seed 0."""
    tmp = tmp_path_factory.mktemp("category_folds")
    patch = pytest.MonkeyPatch()
    patch.setenv("REFTEACHER_CACHE", str(tmp / "cache"))
    try:
        out = tmp / "categories.json"
        assert eval_teacher.main(["--model", str(tiny_model_dir), "--folds", "no:stereotyping,no:jailbreak",
                                  "--seeds", "0,1", "--teacher-folds", "stereotyping,jailbreak", "--threads", "1",
                                  "--set", "layer=2", "--set", "max_steps=1", "--set", "calib_max_harmful=100",
                                  "--work", str(tmp / "work"), "--json", str(out)]) == 0
        yield json.loads(out.read_text()), tmp / "work"
    finally:
        patch.undo()


def test_leave_one_category_out_folds_report_mean_and_worst_over_seeds(category_run):
    folds = {f["category"]: f for f in category_run[0]["category_folds"]}
    assert set(folds) == {"stereotyping", "jailbreak"}
    assert category_run[0]["config"]["lora_rank"] == TAXONOMY_DEFAULTS["lora_rank"]  # built as --taxonomy builds
    stereotyping = folds["stereotyping"]
    for seed in ("0", "1"):
        entry = stereotyping["seeds"][seed]
        assert entry["test"]["harmful"] == 45 and entry["test"]["topic_harmless"] == 30
        figures = entry["raw"]
        assert all(0.0 <= figures[k] <= 1.0 for k in ("auroc", "recall", "fpr_topic", "fpr_everyday"))
    assert "teacher" in stereotyping["seeds"]["0"] and "teacher" not in stereotyping["seeds"]["1"]
    recalls = [stereotyping["seeds"][s]["raw"]["recall"] for s in ("0", "1")]
    assert stereotyping["raw"]["recall"] == {"mean": round(sum(recalls) / 2, 4), "worst": round(min(recalls), 4)}
    assert stereotyping["raw"]["seeds"] == 2 and stereotyping["teacher"]["seeds"] == 1
    jailbreak = folds["jailbreak"]["seeds"]["0"]  # held-out framings: no topic-matched harmless side
    assert jailbreak["test"]["harmful"] > 0 and jailbreak["test"]["topic_harmless"] == 0
    assert jailbreak["raw"]["fpr_topic"] is None


def test_threshold_rules_on_category_folds_choose_on_dev_folds_and_report_the_others(category_run, tmp_path):
    result, work = category_run
    teachers = [f"no:{c}={work / f'teacher-{c}-0'}" for c in ("stereotyping", "jailbreak")]
    argv = [*teachers, "--targets", "build,fpr=0.5", "--gaps", "0,none", "--dev", "stereotyping",
            "--scores", str(tmp_path / "scores")]
    rules = _script("threshold_rules")
    assert rules.main([*argv, "--json", str(tmp_path / "rules.json")]) == 0
    out = json.loads((tmp_path / "rules.json").read_text())
    assert out["dev"] == ["no:stereotyping"] and out["report"] == ["no:jailbreak"]
    assert out["first_rule"] == "build floor=0.0" and out["chosen"] in {r["rule"] for r in out["rows"]}
    # the build's own rule gives each teacher its saved threshold and eval_teacher's figures
    saved = {f["fold"]: f["seeds"]["0"]["teacher"] for f in result["category_folds"]}
    for row in out["rows"]:
        if row["rule"] == "build floor=0.0":
            figures = saved[row["fold"]]
            assert row["threshold"] == pytest.approx(figures["threshold"], abs=1e-6)
            for key in ("recall", "fpr_topic", "fpr_everyday"):
                assert row[key] == pytest.approx(figures[key]) if figures[key] is not None else row[key] is None
        if row["rule"] == "fpr=0.5 floor=none":  # half the harmless calibration prompts flagged: a low threshold
            assert row["threshold"] <= next(r["threshold"] for r in out["rows"]
                                            if r["fold"] == row["fold"] and r["rule"] == "build floor=none")
    assert {(s["folds"], s["rule"]) for s in out["summary"]} >= {("report", out["first_rule"]), ("report", out["chosen"])}
    # a rerun reads the kept scores and gives the same rows
    assert rules.main([*argv, "--json", str(tmp_path / "again.json")]) == 0
    assert json.loads((tmp_path / "again.json").read_text())["rows"] == out["rows"]


def test_probing_a_fold_teacher_reads_other_layers_and_its_own_refusals(category_run, tmp_path):
    result, work = category_run
    probe = _script("probe_fold_teacher")
    out = tmp_path / "probe.json"
    teacher = f"no:stereotyping={work / 'teacher-stereotyping-0'}"
    assert probe.main([teacher, "--layers", "1,4", "--refusals", "--sample", "20", "--answer-tokens", "4",
                       "--json", str(out)]) == 0
    probed = json.loads(out.read_text())
    rows = {(r["layer"], r["direction"]): r for r in probed["layers"]}
    assert set(rows) == {(1, "difference of means"), (2, "teacher feature"), (4, "difference of means")}
    assert all(0.0 <= r[k] <= 1.0 for r in rows.values() for k in ("auroc", "recall", "fpr_topic", "fpr_everyday"))
    saved = next(f for f in result["category_folds"] if f["category"] == "stereotyping")["seeds"]["0"]["teacher"]
    # the teacher's feature at its own layer ranks the left-out prompts as eval_teacher did
    assert rows[(2, "teacher feature")]["auroc"] == pytest.approx(saved["auroc"], abs=1e-3)
    refusals = {r["side"]: r for r in probed["refusals"]}
    assert [refusals[s]["prompts"] for s in ("test_harmful", "topic", "everyday")] == [45, 30, 62]
    assert refusals["test_harmful"]["flagged"] == round(saved["recall"] * 45)  # the feature at the saved threshold
    for r in refusals.values():
        assert max(r["flagged"], r["refused"]) <= r["either"] <= r["flagged"] + r["refused"]
        assert r["either"] - r["flagged"] == r["refused_unflagged"] == len(r["refused_unflagged_prompts"])
    with pytest.raises(SystemExit, match="layers 1 to 4"):
        probe.main([teacher, "--layers", "9"])


@pytest.mark.parametrize("argv, message", [
    (["no:stereotyping=."], "nothing to probe"),
    (["no_matched=.", "--refusals"], "expected no:CATEGORY=TEACHER_DIR"),
    (["no:weather=.", "--refusals"], "expected no:CATEGORY=TEACHER_DIR"),
    (["no:hate=/no/such/folder", "--refusals"], "existing folder"),
    (["no:hate=.", "--layers", "a,b"], "--layers takes layer numbers"),
    (["no:hate=.", "--refusals", "--answer-tokens", "0"], "--answer-tokens at least 1"),
])
def test_bad_probe_arguments_exit_with_a_message(argv, message):
    with pytest.raises(SystemExit, match=message):
        _script("probe_fold_teacher").main(argv)


def test_rule_choice_counts_dev_folds_meeting_every_target_and_breaks_ties_by_order():
    rules = _script("threshold_rules")

    def row(fold, rule, recall, topic=0.0, everyday=0.0):
        return {"fold": fold, "rule": rule, "recall": recall, "fpr_topic": topic, "fpr_everyday": everyday}

    rows = [row("no:a", "first", 0.95), row("no:b", "first", 0.80), row("no:c", "first", 0.80),
            row("no:a", "second", 0.99, topic=0.10), row("no:b", "second", 0.95), row("no:c", "second", 0.10),
            row("no:a", "third", 0.95), row("no:b", "third", 0.95, everyday=0.06), row("no:c", "third", 0.99)]
    assert rules.choose_rule(rows, ["first", "second", "third"], {"no:a", "no:b"}) == "first"  # 1, 1, 1: a tie
    assert rules.choose_rule(rows, ["first", "second", "third"], {"no:a", "no:c"}) == "third"  # 1, 0, 2
    assert rules.row_meets_targets(row("no:jailbreak", "x", 0.9, topic=None))  # a side the fold lacks
    assert not rules.row_meets_targets({"fold": "no_harmbench", "recall": 0.95, "fpr_edgy": 0.2})


def test_a_category_fold_leaves_the_whole_category_out_of_building(eval_teacher):
    from refteacher.engine.data.prompt_sets import load_prompt_set
    from refteacher.engine.teacher.config import TAXONOMY_SETS

    records = [r for name in TAXONOMY_SETS for r in load_prompt_set(name)]
    bh, bb, th, tb, everyday = eval_teacher.category_fold_data(records, "privacy", seed=3)
    assert {r.category for r in th} == {"privacy"} == {r.category for r in tb}
    assert len(th) == sum(r.category == "privacy" and r.label == "harmful" for r in records)
    assert not [r for r in bh + bb if r.category == "privacy"]
    assert {r.source for r in everyday} == {"everyday"}
    assert not {r.prompt for r in everyday} & {r.prompt for r in bb}
    # the everyday test rows are the same whatever the seed
    assert [r.prompt for r in eval_teacher.category_fold_data(records, "hate", seed=0)[4]] == [r.prompt for r in everyday]
    jb_h, _, jb_test, _, _ = eval_teacher.category_fold_data(records, "jailbreak", seed=0)
    assert jb_test and {r.group for r in jb_test}.isdisjoint({r.group for r in jb_h if r.group})


def _fold(category, seeds):
    return {"fold": f"no:{category}", "category": category, "seeds": seeds}


def test_merging_runs_split_over_processes_unions_seeds_and_filters(eval_teacher, tmp_path):
    def figures(recall):
        return {"auroc": 0.9, "recall": recall, "fpr_topic": 0.1 * recall, "fpr_everyday": 0.0, "threshold": 0.1}

    raw_run = [_fold("hate", {"0": {"test": {"harmful": 4}, "raw": figures(0.5)},
                              "1": {"test": {"harmful": 4}, "raw": figures(0.25)}})]
    teacher_run = [_fold("hate", {"0": {"test": {"harmful": 4}, "teacher": figures(1.0)}}),
                   _fold("privacy", {"2": {"test": {"harmful": 3}, "teacher": figures(0.5)}})]
    paths = []
    for i, folds in enumerate((raw_run, teacher_run)):
        paths.append(tmp_path / f"run{i}.json")
        paths[-1].write_text(json.dumps({"model": "m", "category_folds": folds, "seeds": [i]}))
    out = tmp_path / "merged.json"
    assert eval_teacher.main(["--merge", *map(str, paths), "--json", str(out)]) == 0
    merged = json.loads(out.read_text())
    folds = {f["category"]: f for f in merged["category_folds"]}
    assert merged["seeds"] == [0, 1, 2] and merged["model"] == "m"
    assert [run["path"] for run in merged["runs"]] == [str(p) for p in paths]
    assert [f["category"] for f in merged["category_folds"]] == ["privacy", "hate"]  # the taxonomy's order
    hate = folds["hate"]
    assert set(hate["seeds"]["0"]) == {"test", "raw", "teacher"} and set(hate["seeds"]["1"]) == {"test", "raw"}
    assert hate["raw"]["seeds"] == 2 and hate["raw"]["recall"] == {"mean": 0.375, "worst": 0.25}
    assert hate["raw"]["fpr_topic"]["worst"] == 0.05  # the highest false-positive rate is the worst
    assert hate["teacher"] == {"seeds": 1, **eval_teacher.summarise_seeds([figures(1.0)]), "seeds_meeting_targets": 0}
    assert "raw" not in folds["privacy"] and folds["privacy"]["teacher"]["seeds"] == 1
    # merging a merged file again keeps the runs it came from, not itself
    again = tmp_path / "again.json"
    assert eval_teacher.main(["--merge", str(out), str(paths[1]), "--json", str(again)]) == 0
    remerged = json.loads(again.read_text())
    assert [run["path"] for run in remerged["runs"]] == [str(p) for p in paths] + [str(paths[1])]
    assert remerged["category_folds"] == merged["category_folds"]


def test_a_fold_meets_its_targets_only_when_every_seed_does(eval_teacher):
    good = {"auroc": 0.96, "recall": 0.95, "fpr_topic": 0.0, "fpr_everyday": 0.05, "threshold": 0.2}
    assert eval_teacher.meets_targets(good) and eval_teacher.meets_targets({**good, "fpr_topic": None})
    for key, value in (("auroc", 0.94), ("recall", 0.89), ("fpr_topic", 0.06), ("fpr_everyday", 0.07)):
        assert not eval_teacher.meets_targets({**good, key: value}), key
    fold = _fold("hate", {"0": {"teacher": good}, "1": {"teacher": {**good, "recall": 0.8}},
                          "2": {"teacher": good, "raw": {**good, "auroc": 0.7}}})
    eval_teacher.summarise_fold(fold)
    assert fold["teacher"]["seeds_meeting_targets"] == 2 and fold["raw"]["seeds_meeting_targets"] == 0
    passing = _fold("privacy", {"0": {"teacher": good}})
    eval_teacher.summarise_fold(passing)
    table = eval_teacher.category_table([passing, fold])
    assert "| hate | ReFT teacher | 3 |" in table and "| 2 of 3 |" in table
    assert "ReFT teacher: 1 of 2 folds meet every target" in table
    assert "raw diff-of-means: 0 of 1 folds" in table


def test_merging_an_unreadable_file_exits_with_a_message(eval_teacher, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SystemExit, match="cannot read"):
        eval_teacher.main(["--merge", str(bad)])


def test_a_teacher_only_run_skips_the_raw_feature(eval_teacher, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("REFTEACHER_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "teacher.json"
    assert eval_teacher.main(["--model", str(tiny_model_dir), "--folds", "no:stereotyping", "--seeds", "2",
                              "--teacher-folds", "stereotyping", "--teacher-seeds", "2", "--skip-raw",
                              "--threads", "1", "--set", "layer=2", "--set", "max_steps=1",
                              "--set", "calib_max_harmful=100", "--work", str(tmp_path / "work"),
                              "--json", str(out)]) == 0
    (fold,) = json.loads(out.read_text())["category_folds"]
    assert "raw" not in fold and set(fold["seeds"]) == {"2"} and "raw" not in fold["seeds"]["2"]
    figures = fold["seeds"]["2"]["teacher"]
    assert fold["teacher"]["seeds"] == 1 and 0.0 <= figures["recall"] <= 1.0 and figures["build_seconds"] > 0


@pytest.mark.parametrize("taxonomy", [False, True])
def test_source_folds_build_on_the_taxonomy_sets_with_taxonomy(eval_teacher, monkeypatch, tmp_path, taxonomy):
    from refteacher.engine.teacher.config import DEFAULT_SETS, TAXONOMY_SETS

    seen = {}

    def fake_run_fold(fold, records, args, config, model_spec):
        seen["sets"] = {r.source.split(":")[0] for r in records}
        _, _, test_harmful, _, _ = eval_teacher.fold_data(records, fold)
        seen["test_sets"] = {r.source.split(":")[0] for r in test_harmful}
        return {"fold": fold}

    monkeypatch.setattr(eval_teacher, "run_fold", fake_run_fold)
    monkeypatch.setattr(eval_teacher, "table", lambda results: "")
    out = tmp_path / "in_dist.json"
    assert eval_teacher.main(["--folds", "in_dist", "--json", str(out)] + (["--taxonomy"] if taxonomy else [])) == 0
    assert seen["sets"] == set(TAXONOMY_SETS if taxonomy else DEFAULT_SETS)
    assert ("pyrit_objectives" in seen["test_sets"]) == taxonomy  # the test split holds the taxonomy's own prompts
    assert json.loads(out.read_text())["taxonomy"] is taxonomy
