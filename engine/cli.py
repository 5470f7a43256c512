"""The ``refteacher`` command line: one subcommand per job, each defined in its wing's command module.

``COMMANDS`` maps each subcommand to the module and function that add its parser (the function
takes the ``subparsers`` object and sets ``func``, a callable from the parsed namespace to an exit
status) and to its one-line summary. Only the module of the command being run is imported, so
``refteacher --help`` lists the commands without loading torch or transformers.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import NamedTuple, Sequence

from refteacher.engine import __version__
from refteacher.engine.config_args import DefaultsHelpFormatter
from refteacher.engine.errors import UserError


class Command(NamedTuple):
    module: str
    add_parser: str
    summary: str


COMMANDS: dict[str, Command] = {
    "feature": Command("refteacher.engine.teacher.command", "add_feature_cli",
                       "extract the refusal feature (difference of means) and pick its layer by held-out AUROC"),
    "teacher": Command("refteacher.engine.teacher.command", "add_teacher_cli",
                       "train a ReFT teacher (LoRA: refusal SFT + feature loss) and calibrate its threshold"),
    "filter": Command("refteacher.engine.filter.command", "add_filter_cli",
                      "split a finetuning dataset into kept / flagged / rejected rows with a teacher"),
    "merge": Command("refteacher.engine.filter.command", "add_merge_cli",
                     "join the outputs of `refteacher filter --shard I/N` runs"),
    "finetune": Command("refteacher.engine.finetune.command", "add_finetune_cli",
                        "LoRA-finetune a student on kept data, distilling the teacher's alignment (ReFT)"),
    "eval": Command("refteacher.engine.evaluation.command", "add_eval_cli",
                    "harmful score, task accuracy and filter metrics of a model (+ LoRA adapter)"),
    "quickstart": Command("refteacher.engine.quickstart", "add_cli",
                          "end to end on CPU: teacher, poisoned task data, filter, SFT vs ReFT finetune, eval table"),
}


class _CommandParser(argparse.ArgumentParser):
    """The parser of every subcommand: its --help states the defaults (``DefaultsHelpFormatter``)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser(commands: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """Return the top-level parser with the full parsers of ``commands`` (default: all of them);
    every other command is listed with its summary only, and its module is not imported."""
    parser = argparse.ArgumentParser(
        prog="refteacher",
        description=(
            "Refusal-Feature-guided Teacher finetuning (ReFT): a safety-aligned teacher filters "
            "harmful prompts out of user finetuning data and distils its alignment into the "
            "student during LoRA finetuning."
        ),
    )
    parser.add_argument("--version", action="version", version=f"refteacher {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_CommandParser)
    wanted = COMMANDS if commands is None else commands
    for name, command in COMMANDS.items():
        if name in wanted:
            getattr(importlib.import_module(command.module), command.add_parser)(subparsers)
        else:
            subparsers.add_parser(name, help=command.summary)
    return parser


def _command_in(argv: Sequence[str]) -> list[str]:
    """The subcommand named in ``argv`` (its first word that is not an option), as a list of 0 or 1."""
    first = next((word for word in argv if not word.startswith("-")), None)
    return [first] if first in COMMANDS else []


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI on ``argv`` (default ``sys.argv[1:]``); return the process exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command_in(argv))
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        print(f"refteacher {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"refteacher {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
