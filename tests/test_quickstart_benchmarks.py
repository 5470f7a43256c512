"""The benchmarks that reuse a finished quickstart run (distill_study, task_accuracy_gap) read it
through one helper, and a wrong --run is a message, not a traceback."""
from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
harness = pytest.importorskip("harness")


def test_a_finished_run_is_read_with_its_config(tmp_path):
    from refteacher.engine.quickstart import RUN_FILE, QuickstartConfig

    config = QuickstartConfig(seed=5)
    (tmp_path / RUN_FILE).write_text(json.dumps({"settings": asdict(config), "model": "m", "teacher": "t"}))
    details, read = harness.quickstart_run(tmp_path)
    assert read == config and details["teacher"] == "t"


@pytest.mark.parametrize("script", ["distill_study", "task_accuracy_gap"])
def test_a_wrong_run_exits_with_a_message(script, tmp_path):
    module = pytest.importorskip(script)
    with pytest.raises(SystemExit, match="is not a finished quickstart run"):
        module.main(["--run", str(tmp_path / "no_such_run"), "--out", str(tmp_path / "out.json")])
    assert not (tmp_path / "out.json").exists()
