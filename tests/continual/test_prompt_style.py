"""Prompt styles: exact strings of both, validation naming the field, and old configs still resuming."""

import argparse

import pytest

from continual.cli import add_train_parser
from continual.config import TrainConfig
from continual.data import build_prompt, load_task
from continual.errors import ContinualError


@pytest.mark.parametrize("style,expected", [
    ("instruction", "Topic?\nOptions: a, b\nTitle: x\nText: y\nAnswer:"),
    ("raw", "Title: x\nText: y\nAnswer:"),
])
def test_build_prompt_styles(style: str, expected: str) -> None:
    assert build_prompt("Topic?\n", ["a", "b"], "Title: x\nText: y\n\n", 1000, style) == expected


def test_raw_prompt_cuts_input_like_instruction() -> None:
    assert build_prompt("Topic?\n", ["a"], "abcdef\n", 3, "raw") == "abc\nAnswer:"
    assert build_prompt("Topic?\n", ["a"], "ab\ncdef", 3, "raw") == "ab\nAnswer:"  # cut, then final newline gone


def test_default_style_is_instruction() -> None:
    assert TrainConfig().prompt_style == "instruction"
    assert build_prompt("Q\n", ["x"], "in", 10) == "Q\nOptions: x\nin\nAnswer:"


def test_load_task_raw_keeps_subsets(cl_data_dir) -> None:
    inst = load_task(cl_data_dir, "agnews", 5, 3, 0, 50)
    raw = load_task(cl_data_dir, "agnews", 5, 3, 0, 50, prompt_style="raw")
    for a, b in zip(inst.train + inst.test, raw.train + raw.test):
        assert a.gold == b.gold and a.prompt.endswith(b.prompt)  # same seeded subset, same input text
        assert b.prompt.endswith("\nAnswer:") and "Options:" not in b.prompt
        prefix = a.prompt[: -len(b.prompt)]
        assert "\nOptions: " in prefix and prefix.endswith("\n")  # instruction style = instruction + options + raw
    assert len(raw.train) == 5 and len(raw.test) == 3


@pytest.mark.parametrize("make", [
    lambda: TrainConfig(prompt_style="chat"),
    lambda: build_prompt("Q\n", ["x"], "in", 10, "chat"),
])
def test_unknown_style_names_the_field(make) -> None:
    with pytest.raises(ContinualError, match=r"prompt_style must be one of \['instruction', 'raw'\].*'chat'"):
        make()


def test_load_task_unknown_style(cl_data_dir) -> None:
    with pytest.raises(ContinualError, match="prompt_style"):
        load_task(cl_data_dir, "agnews", 1, 1, 0, prompt_style="chat")


def test_cli_option() -> None:
    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers())
    base = ["train", "--data", "d", "--tasks", "agnews", "--out", "o"]
    assert parser.parse_args(base).prompt_style == "instruction"
    assert parser.parse_args(base + ["--prompt-style", "raw"]).prompt_style == "raw"
    with pytest.raises(SystemExit):
        parser.parse_args(base + ["--prompt-style", "chat"])


def test_config_json_records_style_and_old_configs_upgrade() -> None:
    cfg = TrainConfig(method="per-task", prompt_style="raw")
    assert cfg.to_json()["prompt_style"] == "raw"
    assert TrainConfig(**cfg.to_json()) == cfg
    old = TrainConfig(method="per-task").to_json()
    del old["prompt_style"]  # a checkpoint written before the option existed
    assert TrainConfig.upgrade_json(old) == TrainConfig(method="per-task").to_json()
    assert TrainConfig.upgrade_json(old) != cfg.to_json()
