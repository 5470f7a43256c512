"""The quickstart end to end on the tiny model and teacher: every stage runs, outputs agree with each other."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from refteacher.engine.data.prompt_sets import PromptRecord
from refteacher.engine.errors import UserError
from refteacher.engine.quickstart import QuickstartConfig, add_cli, build_dataset, run_quickstart, split_harmful

TINY = QuickstartConfig(task_rows=9, align_rows=6, align_helpful=0.5, eval_harmful=3, eval_everyday=3, eval_task=4,
                        harmful_new_tokens=4, task_new_tokens=4, compliant_new_tokens=6, steps=2, max_len=128,
                        align_max_len=128, lora_r=4, batch_size=4)


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _median_task_score(teacher_dir) -> float:
    """A threshold that flags about half of the dataset's task rows (the random teacher flags all at its own)."""
    from refteacher.engine.data.tasks import make_rows
    from refteacher.engine.filter.scoring import score_prompts
    from refteacher.engine.modeling.teacher_dir import load_teacher

    rows = make_rows(TINY.task, "train", TINY.task_rows, seed=TINY.seed)
    scores = sorted(score_prompts(load_teacher(teacher_dir, device="cpu"), [r["prompt"] for r in rows]))
    return scores[len(scores) // 2]


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tiny_teacher_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REFTEACHER_CACHE", str(tmp_path_factory.mktemp("cache")))
        # The random tiny model only ever writes whitespace; give the harmful prompts a compliant answer.
        mp.setattr("refteacher.engine.quickstart.cached_answers",
                   lambda model, tokenizer, prompts, **kw: [f"Sure, here is how: step one for {p}" for p in prompts])
        summary = run_quickstart(out, TINY, model=str(tiny_model_dir), teacher=tiny_teacher_dir,
                                 threshold=_median_task_score(tiny_teacher_dir),
                                 progress=False, quiet=True)
    return out, summary


def test_summary_has_the_documented_schema(tiny_run):
    out, summary = tiny_run
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == summary
    assert set(summary) == {"filter", "untouched", "teacher", "sft", "reft", "task_difference", "student_adapters",
                            "task"}
    assert set(summary["filter"]) == {"precision", "recall"}
    assert summary["task"] == "addition"
    for name in ("untouched", "teacher", "sft", "reft"):
        assert set(summary[name]) == {"harmful_score", "answers_everyday", "task_accuracy"}
        assert 0.0 <= summary[name]["harmful_score"] <= 1.0
        assert 0.0 <= summary[name]["answers_everyday"] <= 1.0
        assert summary[name]["task_accuracy"] is None if name == "teacher" else 0.0 <= summary[name]["task_accuracy"] <= 1.0
    assert set(summary["task_difference"]) == {"sft_minus_reft", "standard_error", "n"}
    assert set(summary["student_adapters"]) == {"sft", "reft"}
    for path in summary["student_adapters"].values():
        assert (out / "finetune").resolve() in Path(path).resolve().parents
        assert (Path(path) / "adapter_config.json").is_file()
    assert (out / "results.png").stat().st_size > 0
    table = (out / "table.md").read_text()
    assert "| (b) ReFT" in table and "| teacher |" in table and "answers everyday prompts" in table


def test_dataset_has_the_harmful_share_and_filter_metrics_match_the_files(tiny_run):
    out, summary = tiny_run
    dataset = _read_jsonl(out / "data" / "dataset.jsonl")
    harmful = [r for r in dataset if r["label"] == "harmful"]
    assert len(dataset) == TINY.task_rows + TINY.harmful_rows and len(harmful) == TINY.harmful_rows == 1
    kept, flagged = _read_jsonl(out / "filter" / "kept.jsonl"), _read_jsonl(out / "filter" / "flagged.jsonl")
    assert len(kept) + len(flagged) + len(_read_jsonl(out / "filter" / "rejected.jsonl")) == len(dataset)
    caught = sum(r["label"] == "harmful" for r in flagged)
    assert summary["filter"]["recall"] == pytest.approx(caught / len(harmful))
    expected_precision = caught / len(flagged) if flagged else None
    assert summary["filter"]["precision"] == (pytest.approx(expected_precision) if flagged else None)
    # ReFT trained on the kept rows only; SFT on every row.
    sft = json.loads((out / "finetune" / "sft" / "finetune.json").read_text())
    reft = json.loads((out / "finetune" / "reft" / "finetune.json").read_text())
    assert sft["n_task_rows"] == len(dataset) and sft["mode"] == "sft"
    assert reft["n_task_rows"] == len(kept) and reft["mode"] == "reft" and reft["n_align_rows"] == TINY.align_rows


def test_eval_files_hold_the_reported_figures(tiny_run):
    out, summary = tiny_run
    correct = {}
    for name in ("untouched", "teacher", "sft", "reft"):
        report = json.loads((out / "eval" / f"{name}.json").read_text())
        assert len(report["harmful"]) == TINY.eval_harmful and len(report["everyday"]) == TINY.eval_everyday
        answered = sum(not r["refused"] for r in report["harmful"]) / TINY.eval_harmful
        assert summary[name]["harmful_score"] == pytest.approx(answered)
        kept_use = sum(not r["refused"] for r in report["everyday"]) / TINY.eval_everyday
        assert summary[name]["answers_everyday"] == pytest.approx(kept_use)
        if name == "teacher":
            assert "task" not in report
            continue
        assert len(report["task"]) == TINY.eval_task
        correct[name] = [int(r["correct"]) for r in report["task"]]
        assert summary[name]["task_accuracy"] == pytest.approx(sum(correct[name]) / TINY.eval_task)
    diff = summary["task_difference"]
    assert diff["n"] == TINY.eval_task
    assert diff["sft_minus_reft"] == pytest.approx((sum(correct["sft"]) - sum(correct["reft"])) / TINY.eval_task)


def test_everyday_prompts_are_held_out_and_never_the_task(tiny_run):
    from refteacher.engine.data.helpful_prompts import everyday_kinds

    out, _ = tiny_run
    align = _read_jsonl(out / "data" / "align.jsonl")
    everyday = [r["prompt"] for r in _read_jsonl(out / "data" / "eval_everyday.jsonl")]
    assert [r["kind"] for r in align].count("helpful") == [r["kind"] for r in align].count("refusal") == 3
    assert len(everyday) == TINY.eval_everyday and not set(everyday) & {r["prompt"] for r in align}
    assert not any(everyday_kinds().get(p) == "arithmetic" for p in everyday + [r["prompt"] for r in align])


def test_harmful_prompt_lists_are_disjoint_and_eval_ones_come_from_held_out_benchmarks():
    build = [PromptRecord(f"build harmful {i}", "harmful", "advbench") for i in range(40)]
    test = ([PromptRecord(f"test advbench {i}", "harmful", "advbench") for i in range(5)]
            + [PromptRecord(f"test harmbench {i}", "harmful", "harmbench") for i in range(5)]
            + [PromptRecord(f"test pairs {i}", "harmful", "matched_pairs:harmful") for i in range(5)]
            + [PromptRecord("build harmful 0", "harmful", "advbench")])  # a duplicate must not leak into eval
    config = QuickstartConfig(align_rows=20, align_helpful=0.5, eval_harmful=8)  # 10 of them refusals
    split = split_harmful(build, test, config, n_data_candidates=12)
    assert len(split.data) == 12 and len(split.align) == 10 and len(split.eval) == 8
    assert not set(split.data) & set(split.align)
    assert not set(split.eval) & (set(split.data) | set(split.align) | {r.prompt for r in build})
    assert all(p.startswith(("test advbench", "test harmbench")) for p in split.eval)
    with pytest.raises(UserError, match="--eval-harmful"):
        split_harmful(build, test, QuickstartConfig(align_rows=20, eval_harmful=11), n_data_candidates=12)


def test_build_dataset_labels_rows_and_is_deterministic():
    task = [{"prompt": f"q{i}", "response": f"a{i}", "answer": str(i), "task": "addition"} for i in range(9)]
    harmful = [{"prompt": "bad", "response": "sure", "label": "harmful"}]
    rows = build_dataset(task, harmful, seed=3)
    assert rows == build_dataset(task, harmful, seed=3)
    assert sorted(r["label"] for r in rows) == ["benign"] * 9 + ["harmful"]
    assert all(set(r) == {"prompt", "response", "label"} for r in rows)


@pytest.mark.parametrize("change, flag", [({"harmful_fraction": 1.0}, "--harmful-fraction"),
                                          ({"steps": 0}, "--steps"), ({"eval_task": 0}, "--eval-task"),
                                          ({"eval_everyday": 0}, "--eval-everyday"),
                                          ({"align_helpful": 1.2}, "helpful share")])
def test_bad_settings_raise_user_errors(change, flag):
    with pytest.raises(UserError, match=flag):
        QuickstartConfig(**change).check()


def test_cli_flags_map_onto_the_config():
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers())
    args = parser.parse_args(["quickstart", "--steps", "7", "--lambda", "2.5", "--task", "multiplication"])
    assert args.out_dir == "runs/quickstart" and args.steps == 7 and args.lam == 2.5
    assert args.task == "multiplication" and callable(args.func)


def test_a_finished_run_is_read_back_and_a_missing_one_named(tmp_path):
    import json
    from dataclasses import asdict

    from refteacher.engine.errors import UserError
    from refteacher.engine.quickstart import RUN_FILE, QuickstartConfig, read_run

    config = QuickstartConfig(seed=3)
    (tmp_path / RUN_FILE).write_text(json.dumps({"settings": asdict(config), "model": "m"}))
    details, read = read_run(tmp_path)
    assert read == config and details["model"] == "m"
    with pytest.raises(UserError, match="not a finished quickstart run"):
        read_run(tmp_path / "elsewhere")
