"""Options declared on a config dataclass: parsed back into the same config, help and defaults shown."""
from __future__ import annotations

import argparse
import dataclasses

import pytest

from refteacher.engine.config_args import add_config_arguments, config_from_args, option
from refteacher.engine.finetune.config import FinetuneConfig


@dataclasses.dataclass
class Example:
    path: str = option(help="where")
    rank: int = option(8, "the rank")
    scale: float | None = option(None, "a scale")
    mode: str = option("a", "the mode", choices=("a", "b"))
    fast: bool = option(False, "go fast")
    progress: bool = option(True, "hide progress", flag="--no-progress")


def _parser(config_class):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, config_class)
    return parser


def test_flags_types_switches_and_required():
    parser = _parser(Example)
    assert config_from_args(Example, parser.parse_args(["--path", "p"])) == Example(path="p")
    args = parser.parse_args(["--path", "p", "--rank", "3", "--scale", "0.5", "--mode", "b", "--fast", "--no-progress"])
    assert config_from_args(Example, args) == Example("p", 3, 0.5, "b", True, False)
    with pytest.raises(SystemExit):
        parser.parse_args(["--rank", "3"])  # --path is required
    with pytest.raises(SystemExit):
        parser.parse_args(["--path", "p", "--mode", "c"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--path", "p", "--rank", "x"])
    assert "the rank" in parser.format_help()


def test_finetune_options_are_the_config_fields():
    parser = _parser(FinetuneConfig)
    bare = config_from_args(FinetuneConfig, parser.parse_args(["--data", "d", "--out", "o"]))
    assert bare == FinetuneConfig(data="d", out="o")
    args = parser.parse_args(["--data", "d", "--out", "o", "--lambda", "0.5", "--kl", "jsd", "--no-progress"])
    assert config_from_args(FinetuneConfig, args) == FinetuneConfig(data="d", out="o", lam=0.5, kl="jsd", progress=False)
    assert all(f.metadata.get("help") for f in dataclasses.fields(FinetuneConfig))


def test_teacher_options_are_the_config_fields():
    from refteacher.engine.teacher.config import TeacherConfig

    parser = _parser(TeacherConfig)
    args = parser.parse_args(["--lr", "5e-4", "--lora-targets", "q_proj, v_proj", "--data-seed", "2"])
    assert config_from_args(TeacherConfig, args) == TeacherConfig(learning_rate=5e-4, lora_targets=("q_proj", "v_proj"),
                                                                  data_seed=2)
    assert all(f.metadata.get("help") for f in dataclasses.fields(TeacherConfig))


def test_list_fields_take_several_values_and_repeat():
    from refteacher.engine.teacher.config import FeatureConfig

    parser = _parser(FeatureConfig)
    assert config_from_args(FeatureConfig, parser.parse_args([])) == FeatureConfig()
    args = parser.parse_args(["--harmful", "a", "b", "--harmful", "c", "--harmless", "d"])
    config = config_from_args(FeatureConfig, args)
    assert config.harmful == ["a", "b", "c"] and config.harmless == ["d"]


def test_bool_text_parses_both_ways():
    from refteacher.engine.config_args import parse_bool, text_parser

    assert text_parser(bool) is parse_bool and text_parser(bool | None) is parse_bool
    assert [parse_bool(t) for t in ("true", "Yes", " on ", "1")] == [True] * 4
    assert [parse_bool(t) for t in ("false", "NO", "off", "0")] == [False] * 4  # bool("false") would be True
    for text in ("", "maybe", "2"):
        with pytest.raises(ValueError):
            parse_bool(text)
