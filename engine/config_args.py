"""Command-line options declared once, on the config dataclass they fill.

A field's default, type and help live on the dataclass (``option(default, "help")``); a command
adds them to its parser with ``add_config_arguments`` and turns the parsed namespace back into
the config with ``config_from_args``, so the CLI and the Python API cannot drift apart. The rules:
``--field-name`` for ``field_name`` (or ``flag=``), the annotation's type (``X | None`` parses as
X, ``tuple[str, ...]`` as a comma-separated list, ``list[X]`` as one or more values, repeatable),
``choices=`` where given, a field without a default is a required option, and a bool field is
a switch (``--name`` for a default of False; for a default of True give ``flag="--no-name"``).
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Mapping, Sequence, TypeVar

Config = TypeVar("Config")


def option(default: Any = dataclasses.MISSING, help: str = "", *, flag: str | None = None,
           choices: Sequence[Any] | None = None, metavar: str | None = None):
    """A dataclass field that is also a command-line option (see the module docstring)."""
    metadata = {"help": help, "flag": flag, "choices": choices, "metavar": metavar}
    return dataclasses.field(default=default, metadata=metadata)


def _comma_list(text: str) -> tuple[str, ...]:
    """``"a, b"`` -> ``("a", "b")``: how a ``tuple[str, ...]`` field is written on the command line."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def parse_bool(text: str) -> bool:
    """``true/yes/on/1`` -> True, ``false/no/off/0`` -> False (any case); ValueError otherwise.

    ``bool(text)`` would read every non-empty text, ``"false"`` included, as True.
    """
    value = text.strip().lower()
    if value in ("true", "yes", "on", "1"):
        return True
    if value in ("false", "no", "off", "0"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _is_list(annotation: Any) -> bool:
    """True for ``list[X]`` and ``list[X] | None``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_is_list(a) for a in typing.get_args(annotation))
    return typing.get_origin(annotation) is list


def text_parser(annotation: Any) -> Any:
    """The callable that turns command-line text into a value of ``annotation``: ``int``, ``float``,
    ``str``, ``bool`` (``parse_bool``); ``X | None`` and ``list[X]`` give X's, ``tuple[str, ...]`` a
    comma-separated list."""
    if annotation is bool:
        return parse_bool
    if typing.get_origin(annotation) is list:
        return typing.get_args(annotation)[0]
    if typing.get_origin(annotation) is tuple:
        return _comma_list
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        kinds = [a for a in typing.get_args(annotation) if a is not type(None)]
        return text_parser(kinds[0]) if len(kinds) == 1 else str
    return annotation


def add_config_arguments(parser: argparse.ArgumentParser, config_class: type, *,
                         skip: Sequence[str] = (), caller_defaults: Mapping[str, str] | None = None) -> None:
    """Add one option per field of ``config_class`` (except ``skip``) to ``parser``.

    ``caller_defaults`` maps field names to a note on their default, which the caller fills in: those
    options default to None (so a value given can be told from one not given) and their help ends
    with ``(NOTE)``.
    """
    caller_defaults = caller_defaults or {}
    hints = typing.get_type_hints(config_class)
    for field in dataclasses.fields(config_class):
        if field.name in skip or not field.init:
            continue
        meta = field.metadata
        kind = text_parser(hints[field.name])
        flag = meta.get("flag") or "--" + field.name.replace("_", "-")
        kwargs: dict[str, Any] = {"dest": field.name, "help": meta.get("help", "")}
        if kind is parse_bool:  # a switch, not an option taking text
            kwargs["action"] = "store_false" if field.default is True else "store_true"
        elif _is_list(hints[field.name]):  # --name A B, or --name A --name B
            kwargs.update(nargs="+", action="extend", type=kind)
            if meta.get("metavar"):
                kwargs["metavar"] = meta["metavar"]
        else:
            kwargs["type"] = kind
            if meta.get("choices") is not None:
                kwargs["choices"] = list(meta["choices"])
            if meta.get("metavar"):
                kwargs["metavar"] = meta["metavar"]
        if field.name in caller_defaults:
            kwargs.update(default=None, help=f"{kwargs['help']} ({caller_defaults[field.name]})")
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        parser.add_argument(flag, **kwargs)


def config_from_args(config_class: type[Config], args: argparse.Namespace, **overrides: Any) -> Config:
    """Build ``config_class`` from the parsed options it declared (plus ``overrides``)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_class)
              if f.init and hasattr(args, f.name)}
    values.update(overrides)
    return config_class(**values)


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

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        """Wrap a paragraph as usual; keep text that has its own line breaks (a table) line by line."""
        if "\n" in text:
            return "\n".join(indent + line for line in text.splitlines())
        return super()._fill_text(text, width, indent)
