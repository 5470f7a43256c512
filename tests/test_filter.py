"""The streaming filter on the tiny teacher: scores, order, fail-closed, resume after a kill, shards."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from refteacher.engine.data.readers import open_source
from refteacher.engine.errors import UserError
from refteacher.engine.filter import scoring as filter_module
from refteacher.engine.filter.run import iter_verdicts, run_filter
from refteacher.engine.filter.scoring import FilterOptions, score_prompts
from refteacher.engine.filter.shards import find_shard_dirs, merge_shards, shard_from_env
from refteacher.engine.modeling.teacher_dir import load_teacher

from filter_rows import make_prompt, write_rows

OUTPUTS = ("kept.jsonl", "flagged.jsonl", "rejected.jsonl")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny matrices: one thread is fastest and immune to a busy machine's thread contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def teacher(tiny_teacher_dir):
    return load_teacher(tiny_teacher_dir, device="cpu")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def naive_score(teacher, prompt) -> float:
    """Full forward with output_hidden_states, LM head included, one prompt alone."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    text = teacher.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = teacher.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hidden = teacher.model(input_ids=ids, output_hidden_states=True).hidden_states[teacher.layer]
    return F.cosine_similarity(hidden[0, -1], teacher.feature, dim=0).item()


def test_scores_match_a_naive_full_forward(teacher, tmp_path):
    path = write_rows(tmp_path / "in.jsonl", 23)
    options = FilterOptions(batch_tokens=200, window_rows=8)
    verdicts = list(iter_verdicts(teacher, str(path), options))
    rows = read_jsonl(path)
    assert [v.id for v in verdicts] == list(range(1, 24))
    for verdict, row in zip(verdicts, rows):
        if "messages" in row:
            turns = row["messages"]
            expected = max(naive_score(teacher, turns[:1]), naive_score(teacher, turns[:3]))
        else:
            expected = naive_score(teacher, row["prompt"])
        assert verdict.score == pytest.approx(expected, abs=1e-5)
        assert verdict.status == ("flagged" if verdict.score >= teacher.threshold else "kept")
    plain = [r["prompt"] for r in rows if "prompt" in r]
    plain_scores = [v.score for v, r in zip(verdicts, rows) if "prompt" in r]
    assert score_prompts(teacher, plain, batch_tokens=64) == pytest.approx(plain_scores, abs=1e-5)


def test_a_window_runs_its_shared_prefix_once(teacher):
    from refteacher.engine.data.readers import Row
    from refteacher.engine.modeling.chat_prompts import encode_prompts

    options = FilterOptions(batch_tokens=200).resolved(torch.device("cpu"))
    prompts = [make_prompt(i) for i in range(6)]
    window = filter_module._prepare_window(0, [Row(i + 1, i + 1, None, prompts=[p]) for i, p in enumerate(prompts)],
                                           teacher.tokenizer, options, pin=False)
    assert len(window.prefix) >= 20  # the chat template's system prompt, cut from every batch row
    full = [len(ids) for ids in encode_prompts(teacher.tokenizer, prompts)[0]]
    assert sum(b.tokens for b in window.batches) == sum(full)
    assert max(b.input_ids.shape[1] for b in window.batches) == max(full) - len(window.prefix)
    # A conversation with its own system prompt shares only "<|im_start|>system" with the rest: no cut,
    # and its scores still match the naive forward.
    own = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompts[0]}]
    mixed = [Row(1, 1, None, prompts=[own]), Row(2, 2, None, prompts=[prompts[1]])]
    window = filter_module._prepare_window(0, mixed, teacher.tokenizer, options, pin=False)
    assert window.prefix == []
    assert score_prompts(teacher, [own, prompts[1]]) == pytest.approx(
        [naive_score(teacher, own), naive_score(teacher, prompts[1])], abs=1e-5)


def test_packed_batches_score_like_padded_ones(teacher, tmp_path):
    path = write_rows(tmp_path / "in.jsonl", 17)
    padded = [v.score for v in iter_verdicts(teacher, str(path), FilterOptions(batch_tokens=300, packed=False))]
    packed = [v.score for v in iter_verdicts(teacher, str(path), FilterOptions(batch_tokens=300, packed=True))]
    assert packed == pytest.approx(padded, abs=1e-5)


def test_run_filter_writes_ordered_files_and_a_consistent_report(teacher, tmp_path):
    path = write_rows(tmp_path / "in.jsonl", 61, bad_every=9)
    out = tmp_path / "out"
    options = FilterOptions(batch_tokens=256, window_rows=16, max_prompt_tokens=50)
    report = run_filter(teacher, open_source(str(path)), out, options, progress=False)
    files = {name: read_jsonl(out / name) for name in OUTPUTS}
    for rows in files.values():  # input order in every file, despite length-sorted batches
        ids = [r["_id"] for r in rows]
        assert ids == sorted(ids)
    all_ids = sorted(r["_id"] for rows in files.values() for r in rows)
    assert all_ids == list(range(1, 62))  # every row exactly once
    counts = report["counts"]
    assert counts["input_rows"] == 61 == counts["kept"] + counts["flagged"] + counts["rejected"]
    assert (counts["kept"], counts["flagged"], counts["rejected"]) == tuple(len(files[n]) for n in OUTPUTS)
    assert all(r["_score"] < teacher.threshold for r in files["kept.jsonl"])
    assert all(r["_score"] >= teacher.threshold for r in files["flagged.jsonl"])
    assert all(r["_reason"] and r["_line"] == r["_id"] for r in files["rejected.jsonl"])
    original = {i + 1: json.loads(line) for i, line in enumerate(path.read_text().splitlines()) if "broken" not in line}
    for row in files["kept.jsonl"] + files["flagged.jsonl"]:
        assert {k: v for k, v in row.items() if not k.startswith("_")} == original[row["_id"]]
    truncated = [r for r in files["kept.jsonl"] + files["flagged.jsonl"] if r.get("_truncated")]
    assert truncated and counts["truncated"] == len(truncated)
    quantiles = list(report["scores"]["quantiles"].values())
    assert quantiles == sorted(quantiles)
    assert report["scores"]["min"] <= quantiles[0] and quantiles[-1] <= report["scores"]["max"]
    assert report["teacher"]["manifest_sha256"] == teacher.manifest_sha256
    assert report["threshold"] == teacher.threshold and report["threshold_source"] == "teacher"
    assert report["throughput"]["rows_per_s"] > 0 and report["throughput"]["tokens_per_s"] > 0
    assert report["started"] <= report["finished"]
    assert (out / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "report.json").read_text())["counts"] == counts


def test_threshold_override_moves_rows(teacher, tmp_path):
    path = write_rows(tmp_path / "in.jsonl", 20)
    scores = [v.score for v in iter_verdicts(teacher, str(path))]
    middle = sorted(scores)[10]
    report = run_filter(teacher, open_source(str(path)), tmp_path / "out", FilterOptions(threshold=middle),
                        progress=False, plot=False)
    assert report["counts"]["flagged"] == sum(s >= middle for s in scores) == 10
    assert report["threshold"] == middle and report["threshold_source"] == "override"


def test_scoring_error_fails_closed(teacher, tmp_path, monkeypatch):
    path = write_rows(tmp_path / "in.jsonl", 40)
    real = filter_module.refusal_scores
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated device failure")
        if calls["n"] == 3:
            return torch.full_like(real(*args, **kwargs), float("nan"))
        return real(*args, **kwargs)

    monkeypatch.setattr(filter_module, "refusal_scores", flaky)
    out = tmp_path / "out"
    report = run_filter(teacher, open_source(str(path)), out, FilterOptions(batch_tokens=300, window_rows=40),
                        progress=False, plot=False)
    assert calls["n"] > 3
    rejected = read_jsonl(out / "rejected.jsonl")
    reasons = {r["_reason"] for r in rejected}
    assert any("simulated device failure" in r for r in reasons)
    assert any("non-finite" in r for r in reasons)
    written = [r["_id"] for name in ("kept.jsonl", "flagged.jsonl") for r in read_jsonl(out / name)]
    assert not set(written) & {r["_id"] for r in rejected}
    assert report["counts"]["kept"] + report["counts"]["flagged"] + report["counts"]["rejected"] == 40
    assert report["rejected_reasons"]["scoring failed"] == len(rejected)


def test_a_failing_prefix_cache_rejects_its_window(teacher, tmp_path, monkeypatch):
    path = write_rows(tmp_path / "in.jsonl", 12)

    def broken(*args, **kwargs):
        raise RuntimeError("simulated prefix failure")

    monkeypatch.setattr(filter_module, "PrefixCache", broken)
    report = run_filter(teacher, open_source(str(path)), tmp_path / "out", FilterOptions(window_rows=5),
                        progress=False, plot=False)
    rejected = read_jsonl(tmp_path / "out" / "rejected.jsonl")
    assert report["counts"] == {**report["counts"], "kept": 0, "flagged": 0, "rejected": 12}
    assert all("simulated prefix failure" in r["_reason"] for r in rejected)


def test_existing_results_need_resume_or_overwrite(teacher, tmp_path):
    path = write_rows(tmp_path / "in.jsonl", 5)
    out = tmp_path / "out"
    run_filter(teacher, open_source(str(path)), out, progress=False, plot=False)
    with pytest.raises(UserError, match="--resume"):
        run_filter(teacher, open_source(str(path)), out, progress=False, plot=False)
    with pytest.raises(UserError, match="other settings.*threshold"):
        run_filter(teacher, open_source(str(path)), out, FilterOptions(threshold=0.5), resume=True, progress=False)
    again = run_filter(teacher, open_source(str(path)), out, resume=True, progress=False, plot=False)
    assert again["counts"]["input_rows"] == 5  # a finished run resumes to the same result


def test_shards_merge_into_the_single_run_files(teacher, tmp_path):
    path = write_rows(tmp_path / "in.jsonl", 53, bad_every=7)
    options = FilterOptions(batch_tokens=256, window_rows=6)
    single = tmp_path / "single"
    run_filter(teacher, open_source(str(path)), single, options, progress=False, plot=False)
    sharded = tmp_path / "sharded"
    reports = [
        run_filter(teacher, open_source(str(path)), sharded,
                   FilterOptions(batch_tokens=256, window_rows=6, shard=(index, 3)), progress=False, plot=False)
        for index in (2, 0, 1)
    ]
    assert "merged" in reports[-1] and "merged" not in reports[0]  # the last shard to finish merges
    for name in OUTPUTS:
        assert (sharded / name).read_bytes() == (single / name).read_bytes()
    merged = json.loads((sharded / "report.json").read_text())
    assert merged["counts"] == json.loads((single / "report.json").read_text())["counts"]
    assert sum(r["counts"]["input_rows"] for r in reports) == 53
    # the merge command gives the same files again, and refuses an incomplete set
    again = tmp_path / "again"
    merge_shards(find_shard_dirs(sharded), again, plot=False)
    for name in OUTPUTS:
        assert (again / name).read_bytes() == (single / name).read_bytes()
    with pytest.raises(UserError, match="every shard"):
        merge_shards(find_shard_dirs(sharded)[:2], tmp_path / "partial")


def test_shard_from_env(monkeypatch):
    assert shard_from_env("1/4") == (1, 4)
    with pytest.raises(UserError, match="I/N"):
        shard_from_env("1-4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert shard_from_env(None) == (3, 8)
    monkeypatch.delenv("RANK")
    assert shard_from_env(None) == (0, 1)
    with pytest.raises(UserError, match="invalid"):
        FilterOptions(shard=(4, 4)).resolved(torch.device("cpu"))


def cli_command(*args: str) -> list[str]:
    """The `refteacher` console command as a subprocess argv."""
    return [sys.executable, "-m", "refteacher.engine.cli", *args]


def test_resume_after_kill_matches_an_uninterrupted_run(teacher, tiny_teacher_dir, tmp_path):
    path = write_rows(tmp_path / "in.jsonl", 1200, bad_every=97)
    args = ["--batch-tokens", "512", "--window-rows", "20", "--no-progress", "--threads", "1"]
    out = tmp_path / "killed"
    command = cli_command("filter", "--teacher", str(tiny_teacher_dir), "--input", str(path),
                          "--out-dir", str(out), *args)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    checkpoint = out / "checkpoint.json"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        try:
            if json.loads(checkpoint.read_text())["state"]["next_window"] >= 3:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    done = json.loads(checkpoint.read_text())["state"]["rows"]
    assert 0 < done < 1200
    with open(out / "kept.jsonl", "ab") as f:  # a torn, uncommitted last line
        f.write(b'{"prompt": "half a li')
    resumed = subprocess.run(command + ["--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    reference = tmp_path / "reference"
    run_filter(teacher, open_source(str(path)), reference,
               FilterOptions(batch_tokens=512, window_rows=20), progress=False, plot=False)
    for name in OUTPUTS:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    report = json.loads((out / "report.json").read_text())
    assert report["counts"]["input_rows"] == 1200 and report["throughput"]["runs"] == 2


def test_cli_reports_user_errors_in_one_line(tiny_teacher_dir, tmp_path):
    done = subprocess.run(cli_command("filter", "--teacher", str(tiny_teacher_dir), "--input",
                                      str(tmp_path / "missing.jsonl"), "--out-dir", str(tmp_path / "o")),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "does not exist" in done.stderr and "Traceback" not in done.stderr


def test_csv_parquet_and_jsonl_inputs_give_the_same_scores(teacher, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    prompts = [make_prompt(i) for i in range(12)]
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    csv_path = tmp_path / "in.csv"
    csv_path.write_text("prompt\n" + "".join(f'"{p}"\n' for p in prompts))
    parquet = tmp_path / "in.parquet"
    pq.write_table(pa.table({"prompt": prompts}), parquet)
    results = {path.suffix: [(v.id, v.score) for v in iter_verdicts(teacher, str(path))]
               for path in (jsonl, csv_path, parquet)}
    assert results[".csv"] == results[".jsonl"] == results[".parquet"]


def test_empty_input_gives_empty_files_and_a_zero_report(teacher, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    report = run_filter(teacher, open_source(str(empty)), tmp_path / "out", progress=False)
    assert report["counts"]["input_rows"] == 0 and report["scores"]["count"] == 0
    assert all((tmp_path / "out" / name).read_bytes() == b"" for name in OUTPUTS)


@pytest.fixture(scope="module")
def category_teacher(tiny_teacher_dir, tmp_path_factory):
    """The tiny teacher plus three random category directions."""
    from refteacher.engine.modeling.teacher_dir import save_teacher_dir

    base = load_teacher(tiny_teacher_dir, device="cpu")
    generator = torch.Generator().manual_seed(7)
    directions = {slug: torch.randn(base.feature.numel(), generator=generator)
                  for slug in ("hate", "privacy", "jailbreak")}
    path = save_teacher_dir(tmp_path_factory.mktemp("teachers") / "categories", model_spec=base.manifest["model"],
                            model_hash="tiny", feature=base.feature, layer=base.layer, threshold=base.threshold,
                            categories=directions)
    return load_teacher(path, device="cpu"), directions


def test_flagged_rows_name_the_nearest_category_and_the_report_counts_them(teacher, category_teacher, tmp_path):
    with_categories, directions = category_teacher
    assert with_categories.categories == ("hate", "privacy", "jailbreak")
    assert with_categories.score_features().shape == (4, teacher.feature.numel())
    path = write_rows(tmp_path / "in.jsonl", 40)
    options = FilterOptions(batch_tokens=256, window_rows=16)
    plain = run_filter(teacher, open_source(str(path)), tmp_path / "plain", options, progress=False)
    report = run_filter(with_categories, open_source(str(path)), tmp_path / "cat", options, progress=False)
    assert report["counts"] == plain["counts"]  # the verdict is the refusal feature's alone
    flagged = read_jsonl(tmp_path / "cat" / "flagged.jsonl")
    assert flagged and all("_category" not in r for r in read_jsonl(tmp_path / "cat" / "kept.jsonl"))
    for row in flagged:  # the category is the direction nearest the row's highest-scoring prompt
        prompts = ([m["content"] for m in row["messages"] if m["role"] == "user"] if "messages" in row
                   else [row["prompt"]])
        scores = score_prompts(teacher, prompts, max_prompt_tokens=None)
        best = prompts[max(range(len(prompts)), key=scores.__getitem__)]
        messages = [{"role": "user", "content": best}]
        text = teacher.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = teacher.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            hidden = teacher.model(input_ids=ids, output_hidden_states=True).hidden_states[teacher.layer][0, -1]
        nearest = max(directions, key=lambda slug: F.cosine_similarity(hidden, directions[slug], dim=0).item())
        assert row["_category"] == nearest
    counts = report["flagged_by_category"]
    assert sum(counts.values()) == report["counts"]["flagged"] == len(flagged)
    assert counts == {slug: sum(r["_category"] == slug for r in flagged) for slug in counts}
    assert "flagged_by_category" in plain and plain["flagged_by_category"] == {}


def test_a_teacher_whose_directions_do_not_match_its_manifest_is_refused(category_teacher, tmp_path):
    import shutil

    with_categories, _ = category_teacher
    broken = tmp_path / "broken"
    shutil.copytree(with_categories.path, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["categories"] = manifest["categories"][:2]
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="lacks the directions of the manifest's 2 categories"):
        load_teacher(broken, device="cpu")
