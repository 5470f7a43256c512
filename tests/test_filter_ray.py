"""The Ray Data filter on a local Ray (2 CPUs) and the tiny teacher: the single filter's scores and
verdicts, every row exactly once, Parquet in and out, a worker killed mid-run, the CLI."""
from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from refteacher.engine.cli import main as cli_main  # noqa: E402
from refteacher.engine.data.readers import open_source  # noqa: E402
from refteacher.engine.errors import UserError  # noqa: E402
from refteacher.engine.filter.ray_engine import TeacherBatchScorer, plan_workers, run_filter_ray  # noqa: E402
from refteacher.engine.filter.run import run_filter  # noqa: E402
from refteacher.engine.filter.scoring import FilterOptions  # noqa: E402
from refteacher.engine.modeling.teacher_dir import load_teacher  # noqa: E402

from filter_rows import make_prompt, write_rows  # noqa: E402

STATUSES = ("kept", "flagged", "rejected")


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """One local Ray for the whole module (starting one takes seconds); 2 CPUs, as on CI."""
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actors need this module's scorers
    torch.set_num_threads(1)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def teacher(tiny_teacher_dir):
    return load_teacher(tiny_teacher_dir, device="cpu")


def read_outputs(folder: Path) -> dict[str, list[dict]]:
    return {s: [json.loads(line) for line in (folder / f"{s}.jsonl").read_text().splitlines()] for s in STATUSES}


def assert_same_verdicts(single: dict[str, list[dict]], other: dict[str, list[dict]]) -> None:
    """Every row in the same file with the same fields, scores within 1e-5."""
    for status in STATUSES:
        assert [r["_id"] for r in other[status]] == [r["_id"] for r in single[status]], status
        for mine, theirs in zip(other[status], single[status]):
            if status != "rejected":
                assert mine.pop("_score") == pytest.approx(theirs.pop("_score"), abs=1e-5)
            assert mine == theirs


def test_ray_engine_gives_the_single_filters_verdicts(teacher, tiny_teacher_dir, tmp_path):
    path = write_rows(tmp_path / "in.jsonl", 70, bad_every=9, blank_lines=True)
    options = FilterOptions(batch_tokens=256, window_rows=8, max_prompt_tokens=50)
    single = run_filter(teacher, open_source(str(path)), tmp_path / "single", options, progress=False, plot=False)
    report = run_filter_ray(tiny_teacher_dir, open_source(str(path)), tmp_path / "ray", options, workers=2,
                            progress=False)
    outputs = read_outputs(tmp_path / "ray")
    assert_same_verdicts(read_outputs(tmp_path / "single"), outputs)
    ids = sorted(r["_id"] for rows in outputs.values() for r in rows)
    assert len(ids) == len(set(ids)) == 70  # every input row exactly once
    assert {r["_reason"] for r in outputs["rejected"]} >= {"empty prompt in 'prompt'"}
    assert any(r["_reason"].startswith("not valid JSON") and r["_raw"] == "{broken json" for r in outputs["rejected"])
    assert report["counts"] == single["counts"] and report["counts"]["truncated"] > 0
    assert report["rejected_reasons"] == single["rejected_reasons"]
    assert set(report) == set(single) | {"engine"}
    assert report["engine"]["workers"] == 2 and report["throughput"]["rows_per_s"] > 0
    assert report["throughput"]["tokens"] == single["throughput"]["tokens"]
    assert json.loads((tmp_path / "ray" / "report.json").read_text())["counts"] == report["counts"]
    assert (tmp_path / "ray" / "scores.png").is_file()
    assert not list((tmp_path / "ray").glob(".*partial"))


class KilledOnceScorer(TeacherBatchScorer):
    """A scorer whose process is SIGKILLed in the middle of its second batch, once per run (marker file)."""

    def __init__(self, *args, marker: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.marker = marker

    def __call__(self, batch):
        if self.batches == 1:
            try:
                fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass
            else:
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                os.kill(os.getpid(), signal.SIGKILL)
        return super().__call__(batch)


def test_a_worker_killed_mid_run_is_retried_without_loss_or_duplicates(teacher, tiny_teacher_dir, tmp_path):
    path = write_rows(tmp_path / "in.jsonl", 120, bad_every=9, blank_lines=True)
    options = FilterOptions(window_rows=10)
    marker = tmp_path / "killed.pid"

    class Scorer(KilledOnceScorer):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, marker=str(marker), **kwargs)

    report = run_filter_ray(tiny_teacher_dir, open_source(str(path)), tmp_path / "ray", options, workers=2,
                            progress=False, plot=False, scorer=Scorer)
    assert marker.is_file(), "no worker was killed"
    run_filter(teacher, open_source(str(path)), tmp_path / "single", options, progress=False, plot=False)
    outputs = read_outputs(tmp_path / "ray")
    ids = [r["_id"] for rows in outputs.values() for r in rows]
    assert len(ids) == len(set(ids)) and report["counts"]["input_rows"] == 120
    assert_same_verdicts(read_outputs(tmp_path / "single"), outputs)


class FailingScorer(TeacherBatchScorer):
    """A scorer whose forward pass fails for a batch whose first prompt starts with FAIL."""

    def __call__(self, batch):
        from refteacher.engine.filter import scoring

        real = scoring.refusal_scores

        def broken(*args, **kwargs):
            raise RuntimeError("simulated device failure")

        scoring.refusal_scores = broken if str(batch.column("prompt")[0].as_py()).startswith("FAIL") else real
        try:
            return super().__call__(batch)
        finally:
            scoring.refusal_scores = real


def test_the_scorer_on_a_providers_own_dataset_fails_closed(tiny_teacher_dir):
    prompts = [make_prompt(0), make_prompt(1), make_prompt(2), "FAIL " + make_prompt(3), "", "FAIL"]
    dataset = ray.data.from_items([{"prompt": p, "user": f"u{i}"} for i, p in enumerate(prompts)])
    scored = dataset.map_batches(
        FailingScorer, fn_constructor_args=(str(tiny_teacher_dir),), fn_constructor_kwargs={"threads": 1},
        batch_format="pyarrow", batch_size=3, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1).take_all()
    scored.sort(key=lambda row: row["user"])
    assert [r["user"] for r in scored] == [f"u{i}" for i in range(6)] and "_id" not in scored[0]
    assert [r["_verdict"] for r in scored[:3]] == ["flagged" if r["_score"] >= 0.1 else "kept" for r in scored[:3]]
    assert [(r["_verdict"], r["_score"]) for r in scored[3:]] == [("rejected", None)] * 3  # never kept
    assert scored[3]["_reason"] == scored[5]["_reason"] == "scoring failed (RuntimeError: simulated device failure)"
    assert scored[4]["_reason"] == "empty prompt in 'prompt'"


def test_cli_parquet_in_parquet_out(teacher, tiny_teacher_dir, tmp_path, capsys):
    prompts = [make_prompt(i) for i in range(30)]
    prompts[4], prompts[11] = "", None
    path = tmp_path / "in.parquet"
    table = pa.table({"prompt": prompts, "n": list(range(30)), "tags": [[str(i)] for i in range(30)]})
    pq.write_table(table, path, row_group_size=7)  # five row groups: read in parts
    run_filter(teacher, open_source(str(path)), tmp_path / "single", FilterOptions(window_rows=6), progress=False,
               plot=False)
    out = tmp_path / "out"
    args = ["filter", "--teacher", str(tiny_teacher_dir), "--input", str(path), "--out-dir", str(out),
            "--engine", "ray", "--workers", "2", "--window-rows", "6", "--no-progress"]
    assert cli_main(args) == 0
    assert "30 rows:" in capsys.readouterr().out
    single = read_outputs(tmp_path / "single")
    files = {s: pq.read_table(out / f"{s}.parquet") for s in STATUSES}
    assert files["kept"].column_names == ["prompt", "n", "tags", "_id", "_score", "_truncated"]
    assert files["rejected"].column_names == ["prompt", "n", "tags", "_id", "_line", "_reason"]
    assert files["kept"].schema.field("tags").type == pa.list_(pa.string())  # input columns keep their types
    for status in ("kept", "flagged"):
        rows = files[status].to_pylist()
        assert [r["_id"] for r in rows] == [r["_id"] for r in single[status]]
        for mine, theirs in zip(rows, single[status]):
            assert mine["_score"] == pytest.approx(theirs["_score"], abs=1e-5)
            assert mine["n"] == theirs["n"] == mine["_id"] - 1
    rejected = files["rejected"].to_pylist()
    assert [(r["_id"], r["_reason"]) for r in rejected] == [(r["_id"], r["_reason"]) for r in single["rejected"]]
    assert [r["_id"] for r in rejected] == [5, 12]
    report = json.loads((out / "report.json").read_text())
    assert report["engine"]["name"] == "ray" and report["settings"]["output_format"] == "parquet"
    assert report["counts"]["input_rows"] == sum(t.num_rows for t in files.values()) == 30
    # what the command refuses, in one line each
    assert cli_main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli_main(args + ["--resume"]) == 2
    assert "--resume is for --engine single" in capsys.readouterr().err
    assert cli_main(args[:7] + ["--workers", "2"]) == 2
    assert "--workers needs --engine ray" in capsys.readouterr().err
    jsonl = write_rows(tmp_path / "in.jsonl", 3, bad_every=9, blank_lines=True)
    assert cli_main(args[:4] + [str(jsonl), "--out-dir", str(tmp_path / "o2"), "--engine", "ray",
                                "--output-format", "parquet"]) == 2
    assert "Parquet output needs Parquet input" in capsys.readouterr().err
    csv = tmp_path / "in.csv"
    csv.write_text("prompt\nhello\n")
    assert cli_main(args[:4] + [str(csv), "--out-dir", str(tmp_path / "o3"), "--engine", "ray"]) == 2
    assert "JSONL or Parquet" in capsys.readouterr().err
    # a teacher whose model the workers cannot load: the workers' UserError, in one line
    broken = tmp_path / "broken_teacher"
    shutil.copytree(tiny_teacher_dir, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    (broken / "manifest.json").write_text(json.dumps({**manifest, "model": str(tmp_path / "no_model")}))
    assert cli_main(["filter", "--teacher", str(broken), *args[3:7], "--overwrite", "--engine", "ray",
                     "--workers", "1"]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert not (out / "kept.parquet").exists()  # replaced by nothing: no run finished


def test_plan_workers():
    assert plan_workers({"CPU": 8.0}) == plan_workers({"CPU": 8.0}, device="cpu", threads=1)
    cpu = plan_workers({"CPU": 8.0}, threads=2)
    assert (cpu.device, cpu.workers, cpu.threads, cpu.cpus_per_worker, cpu.gpus_per_worker) == ("cpu", 4, 2, 2.0, 0.0)
    gpu = plan_workers({"CPU": 32.0, "GPU": 4.0})
    assert (gpu.device, gpu.workers, gpu.gpus_per_worker) == ("cuda", 4, 1.0)
    assert plan_workers({"CPU": 32.0, "GPU": 4.0}, device="cpu", workers=3).workers == 3
    with pytest.raises(UserError, match="no GPUs"):
        plan_workers({"CPU": 2.0}, device="cuda")
    with pytest.raises(UserError, match="--workers"):
        plan_workers({"CPU": 2.0}, workers=0)
