"""``multitask``: one LoRA trained jointly on all tasks' data (the usual upper bound).

To fill the accuracy matrix, stage t trains a fresh LoRA on the shuffled union of tasks 0..t's training examples
(row t is the joint model over the first t+1 tasks); the last row is the plain multi-task model. With
``joint_only`` the stages before the last train nothing (their rows are the untrained start: the base model), so
only the joint model is paid for; its AP is the one to compare with, its FT/BWT then mean nothing.
"""

from __future__ import annotations

import random

from torch import nn

from ..data import Example
from . import register_method
from .base import Method


@register_method("multitask")
class Multitask(Method):
    uses_rehearsal = False

    def untrained(self, t: int) -> bool:
        return self.cfg.joint_only and t < len(self.tasks) - 1

    def train_examples(self, t: int) -> list[Example]:
        if self.untrained(t):
            return []
        pool = [ex for task in self.tasks[: t + 1] for ex in task.train]
        random.Random(f"{self.cfg.seed}:multitask:{t}").shuffle(pool)
        return pool

    def begin_task(self, t: int) -> list[nn.Parameter]:
        return self.reset_single_branch()
