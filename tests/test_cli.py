"""The console script: --version, --help, and a bare call."""
import subprocess
import sys

from refteacher.engine import __version__
from refteacher.engine.cli import main


def test_version_flag_prints_installed_version(capsys):
    try:
        main(["--version"])
    except SystemExit as stop:
        assert stop.code == 0
    assert __version__ in capsys.readouterr().out


def test_bare_call_prints_help_and_succeeds(capsys):
    assert main([]) == 0
    assert "usage: refteacher" in capsys.readouterr().out


def test_console_script_help_runs_as_a_process():
    done = subprocess.run(
        [sys.executable, "-m", "refteacher.engine.cli", "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "refusal" in done.stdout.lower()


def test_every_subcommand_help_states_meaningful_defaults_only():
    import argparse
    import re

    from refteacher.engine.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert {"teacher", "filter", "finetune", "eval"} <= set(commands)
    for name, sub in commands.items():
        text = " ".join(sub.format_help().split())  # argparse wraps lines
        assert not re.search(r"\(default: (None|True|False|\[\]|)\)", text), name
    finetune = " ".join(commands["finetune"].format_help().split())
    assert "weight of the KL term (chosen in docs/helpfulness.md) (default: 3.0)" in finetune
    teacher = " ".join(commands["teacher"].format_help().split())
    assert "training steps (default: 60)" in teacher
