"""Benchmark data: tasks, task orders and the prompt format shared by training, evaluation and serving.

Layout (see the data's README): ``<root>/<task>/{train,dev,test}.jsonl`` with ``{"task", "input", "output"}``,
``<root>/manifest.json`` (per task: ``olora_instruction`` and label counts) and ``<root>/task_orders.json``.

Prompt (plain text, no chat template; the exact string is what the model is fed and what a server receives),
one of ``PROMPT_STYLES``::

    instruction (default):  {olora_instruction}Options: {label_1}, {label_2}, ...\n{input}\nAnswer:
    raw:                    {input}\nAnswer:

``raw`` carries no task identity in the text (for serving behind a router, which must infer the task from the
input alone). The gold continuation is ``" " + output`` followed by EOS. Labels are listed sorted, taken from the
train split.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import ContinualError

DEFAULT_INSTRUCTION = "Choose the correct answer.\n"  # tasks whose manifest has no instruction (copa)


@dataclass(frozen=True)
class Example:
    """One prompt/answer pair; ``prompt`` is exactly the text fed to the model."""

    task: str
    prompt: str
    gold: str


@dataclass(frozen=True)
class TaskData:
    name: str
    train: list[Example]
    test: list[Example]


def resolve_tasks(data_dir: Path, order: str | None, tasks: str | None) -> list[str]:
    """Task names from ``--order`` (a key of task_orders.json) or ``--tasks a,b,c``; exactly one must be given."""
    data_dir = Path(data_dir)
    if bool(order) == bool(tasks):
        raise ContinualError("give exactly one of --order NAME or --tasks a,b,c")
    if order:
        orders = json.loads((data_dir / "task_orders.json").read_text())
        if order not in orders:
            raise ContinualError(f"unknown order {order!r}; known: {sorted(orders)}")
        names = list(orders[order])
    else:
        names = [t.strip() for t in str(tasks).split(",") if t.strip()]
    missing = [t for t in names if not (data_dir / t / "train.jsonl").is_file()]
    if missing:
        raise ContinualError(f"tasks {missing} not found under {data_dir} (expected <task>/train.jsonl)")
    if len(set(names)) != len(names):
        raise ContinualError(f"task list has duplicates: {names}")
    return names


def _instruction_prompt(instruction: str, labels: list[str], body: str) -> str:
    return f"{instruction}Options: {', '.join(labels)}\n{body}\nAnswer:"


def _raw_prompt(instruction: str, labels: list[str], body: str) -> str:
    return f"{body}\nAnswer:"


# style name -> (instruction, sorted labels, input already cut) -> prompt
PROMPT_STYLES: dict[str, Callable[[str, list[str], str], str]] = {
    "instruction": _instruction_prompt,
    "raw": _raw_prompt,
}


def prompt_style_problem(style: str) -> str | None:
    """What is wrong with ``style`` as a prompt style, or None."""
    if style not in PROMPT_STYLES:
        return f"prompt_style must be one of {sorted(PROMPT_STYLES)} (got {style!r})"
    return None


def check_prompt_style(style: str) -> None:
    if (problem := prompt_style_problem(style)) is not None:
        raise ContinualError(problem)


def build_prompt(instruction: str, labels: list[str], text: str, max_input_chars: int,
                 style: str = "instruction") -> str:
    """The model's input for one example; ``text`` is cut to ``max_input_chars`` and stripped of final newlines."""
    check_prompt_style(style)
    body = text[:max_input_chars].rstrip("\n")
    return PROMPT_STYLES[style](instruction, labels, body)


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_task(data_dir: Path, name: str, max_train: int | None, max_test: int | None, seed: int,
              max_input_chars: int = 1000, prompt_style: str = "instruction") -> TaskData:
    """Load one task; ``max_train``/``max_test`` take a seeded random subset (the test split is never trained on)."""
    check_prompt_style(prompt_style)
    data_dir = Path(data_dir)
    manifest = json.loads((data_dir / "manifest.json").read_text())
    info = manifest.get("tasks", {}).get(name, {})
    instruction = info.get("olora_instruction") or DEFAULT_INSTRUCTION
    train_rows = _read_jsonl(data_dir / name / "train.jsonl")
    test_rows = _read_jsonl(data_dir / name / "test.jsonl")
    labels = sorted(info.get("train", {}).get("labels") or {r["output"] for r in train_rows})

    def pick(rows: list[dict], n: int | None, salt: str) -> list[dict]:
        rows = list(rows)
        random.Random(f"{seed}:{name}:{salt}").shuffle(rows)
        return rows if n is None else rows[:n]

    def to_examples(rows: list[dict]) -> list[Example]:
        return [Example(name, build_prompt(instruction, labels, r["input"], max_input_chars, prompt_style),
                        str(r["output"]))
                for r in rows]

    return TaskData(name, to_examples(pick(train_rows, max_train, "train")), to_examples(pick(test_rows, max_test, "test")))
