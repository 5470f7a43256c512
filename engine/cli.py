"""The ``refteacher`` command line: one subcommand per job, each defined next to the code it runs.

Each module listed in ``_COMMAND_MODULES`` exposes ``add_cli(subparsers)``, which adds its
subparser and sets ``func`` (a callable taking the parsed ``argparse.Namespace`` and returning an
exit status). Heavy imports (torch, transformers) happen inside those functions, so ``--help`` is
quick.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from refteacher.engine import __version__
from refteacher.engine.errors import UserError

_COMMAND_MODULES: tuple[str, ...] = (
    "feature", "teacher", "filter", "merge", "distill", "eval", "quickstart",
)


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to an option's help, except where the help already speaks of its
    default or X says nothing (None, an empty list or string, or the True/False of a switch)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or default is None or default is argparse.SUPPRESS or isinstance(default, bool) \
                or (isinstance(default, (list, tuple, str)) and not default):
            return text
        return super()._get_help_string(action)


class _CommandParser(argparse.ArgumentParser):
    """The parser of every subcommand: its --help states the defaults (``DefaultsHelpFormatter``)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """Return the top-level argument parser with every available subcommand registered."""
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
    for name in _COMMAND_MODULES:
        importlib.import_module(f"refteacher.engine.{name}").add_cli(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI on ``argv`` (default ``sys.argv[1:]``); return the process exit status."""
    parser = build_parser()
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
