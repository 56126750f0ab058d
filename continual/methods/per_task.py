"""``per-task``: an independent LoRA per task, evaluated with the oracle task id (task j -> adapter j).

Tasks not trained yet are evaluated with the bare base model. Each task's adapter is exported as
``<name>-<task>``.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from ..export import write_peft
from . import register_method
from .base import Method


@register_method("per-task")
class PerTask(Method):
    uses_rehearsal = False

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.saved: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}  # task -> path -> (A, B)

    def begin_task(self, t: int) -> list[nn.Parameter]:
        return self.reset_single_branch()

    def end_task(self, t: int) -> None:
        self.saved[t] = {p: (l.As[0].detach().clone(), l.Bs[0].detach().clone()) for p, l in self.layers.items()}
        self.freeze_all()

    def _install(self, t: int | None) -> None:
        for path, layer in self.layers.items():
            if t is None:
                layer.enabled = False
                continue
            layer.enabled = True
            A, B = self.saved[t][path]
            with torch.no_grad():
                layer.As[0].copy_(A)
                layer.Bs[0].copy_(B)

    @contextmanager
    def evaluating(self, j: int) -> Iterator[None]:
        self._install(j if j in self.saved else None)
        try:
            yield
        finally:
            self._install(max(self.saved) if self.saved else None)

    def export(self, out_dir: Path, t: int) -> list[tuple[str, Path]]:
        name = f"{self.cfg.name}-{self.tasks[t].name}"
        modules = {p: (A.float().cpu(), B.float().cpu()) for p, (A, B) in self.saved[t].items()}
        path = Path(out_dir) / name
        write_peft(path, modules, self.cfg.scale, self.cfg.target_modules, self.base_name)
        return [(name, path)]

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors, meta = super().state()
        for t, mods in self.saved.items():
            for path, (A, B) in mods.items():
                tensors[f"task.{t}.{path}.A"] = A
                tensors[f"task.{t}.{path}.B"] = B
        meta["saved_tasks"] = sorted(self.saved)
        return tensors, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        super().load_state(tensors, meta)
        self.saved = {
            int(t): {p: (tensors[f"task.{t}.{p}.A"].to(self.device), tensors[f"task.{t}.{p}.B"].to(self.device))
                     for p in self.layers}
            for t in meta["saved_tasks"]
        }
