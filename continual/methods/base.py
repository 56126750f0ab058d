"""The contract every continual method implements; the runner (continual/runner.py) drives it.

Per task t the runner calls: ``train_examples(t)`` -> ``begin_task(t)`` (returns the parameters to optimise) ->
for each batch ``set_batch(prompt_ids)``, forward, ``penalty()``, backward, ``after_backward()``, step,
``after_step()`` -> ``end_task(t)`` -> (``wants_memory``: ``start_recording()``, no-grad forwards over task t's
training examples, ``finish_recording(t)``) -> for each task j ``with evaluating(j): ...`` -> ``export(dir, t)`` -> ``state()`` (checkpoint).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from ..config import TrainConfig
from ..data import Example, TaskData
from ..export import write_peft
from ..lora_layer import GateContext, LoraLinear, attach_lora


class Method(ABC):
    """Base: one plain LoRA branch per wrapped module, exported as PEFT. Subclasses override the hooks."""

    name = "base"
    wants_memory = False  # True: the runner calls start_recording / forwards task t's train set / finish_recording
    memory_forward = True  # whether that pass needs full model forwards (else only set_batch)
    uses_rehearsal = True  # whether --rehearsal replays earlier tasks' examples into this method's training

    def __init__(self, model: nn.Module, cfg: TrainConfig, tasks: list[TaskData], base_name: str) -> None:
        self.model = model
        self.cfg = cfg
        self.tasks = tasks
        self.base_name = base_name
        self.ctx = GateContext()
        self.layers: dict[str, LoraLinear] = attach_lora(model, cfg.target_modules, cfg.scale, self.ctx)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.device = next(model.parameters()).device

    # ---- training hooks -------------------------------------------------------------------------------------
    def train_examples(self, t: int) -> list[Example]:
        return list(self.tasks[t].train)

    @abstractmethod
    def begin_task(self, t: int) -> list[nn.Parameter]:
        """Prepare task ``t`` (add or freeze branches) and return the parameters the optimiser trains."""

    def untrained(self, t: int) -> bool:
        """Whether stage ``t`` leaves the model at its untrained start (two such stages in a row need one
        evaluation)."""
        return False

    def param_groups(self, params: list[nn.Parameter]) -> list[dict]:
        """Optimiser groups over ``begin_task``'s parameters (a group without ``lr`` uses the config's)."""
        return [{"params": params}]

    @staticmethod
    def own_lr_groups(params: list[nn.Parameter], own: list[nn.Parameter], lr: float) -> list[dict]:
        """Two groups: ``params`` outside ``own`` at the config's lr, those in ``own`` at ``lr``."""
        ids = {id(p) for p in own}
        return [{"params": [p for p in params if id(p) not in ids]},
                {"params": [p for p in params if id(p) in ids], "lr": lr}]

    def set_batch(self, prompt_ids: list[list[int]]) -> None:
        """Called before every forward (training and evaluation) with each row's prompt token ids."""

    def penalty(self) -> torch.Tensor | None:
        return None

    def after_backward(self) -> None:
        """Gradient surgery (projections) between backward and the optimiser step."""

    def after_step(self) -> None:
        """Parameter surgery after the optimiser step (e.g. projecting an update off protected subspaces)."""

    def end_task(self, t: int) -> None:
        """Freeze / fold / record memories after task t's training."""

    def start_recording(self) -> None:
        """Begin accumulating activation statistics (GPM memories) over the next forwards."""

    def finish_recording(self, t: int) -> None:
        """Turn the recorded statistics of task t into memories."""

    def shared_params(self) -> dict[str, torch.Tensor]:
        """Parameters that carry over from task to task (EWC anchors these); empty when nothing is shared."""
        return {}

    @contextmanager
    def evaluating(self, j: int) -> Iterator[None]:
        """Select the weights that answer task j (task-agnostic methods ignore j)."""
        yield

    # ---- export ---------------------------------------------------------------------------------------------
    def served_modules(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """path -> (A (R, in), B' (out, R)) with ΔW = scale · B' A exactly as the training-time model computes."""
        out = {}
        for path, layer in self.layers.items():
            A = torch.cat(list(layer.As), 0).detach()
            B = torch.cat(list(layer.Bs), 1).detach()
            R = layer.routing()
            if R is not None:
                B = B @ R.detach()
            out[path] = (A.float().cpu(), B.float().cpu())
        return out

    def export(self, out_dir: Path, t: int) -> list[tuple[str, Path]]:
        """Write the servable adapter(s) after task t; returns (adapter name, directory) pairs."""
        path = Path(out_dir) / self.cfg.name
        write_peft(path, self.served_modules(), self.cfg.scale, self.cfg.target_modules, self.base_name)
        return [(self.cfg.name, path)]

    # ---- checkpoint -----------------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors: dict[str, torch.Tensor] = {}
        for path, layer in self.layers.items():
            for i, (A, B) in enumerate(zip(layer.As, layer.Bs)):
                tensors[f"lora.{path}.A.{i}"] = A.detach()
                tensors[f"lora.{path}.B.{i}"] = B.detach()
            if layer.R_old is not None:
                tensors[f"lora.{path}.R_old"] = layer.R_old.detach()
            if layer.R_delta is not None:
                tensors[f"lora.{path}.R_delta"] = layer.R_delta.detach()
        any_layer = next(iter(self.layers.values()))
        return tensors, {"branches": any_layer.ranks}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        for path, layer in self.layers.items():
            layer.clear()
            for i, _ in enumerate(meta["branches"]):
                layer.As.append(nn.Parameter(tensors[f"lora.{path}.A.{i}"].to(self.device), requires_grad=False))
                layer.Bs.append(nn.Parameter(tensors[f"lora.{path}.B.{i}"].to(self.device), requires_grad=False))
            if f"lora.{path}.R_old" in tensors:
                layer.R_old = tensors[f"lora.{path}.R_old"].to(self.device)
            if f"lora.{path}.R_delta" in tensors:
                layer.R_delta = nn.Parameter(tensors[f"lora.{path}.R_delta"].to(self.device), requires_grad=False)

    # ---- helpers for subclasses -----------------------------------------------------------------------------
    def reset_single_branch(self) -> list[nn.Parameter]:
        """Replace all branches by one fresh LoRA branch per module; returns its parameters."""
        params: list[nn.Parameter] = []
        for layer in self.layers.values():
            layer.clear()
            layer.enabled = True
            layer.add_branch(self.cfg.rank, self.gen)
            params += [layer.As[0], layer.Bs[0]]
        return params

    def freeze_all(self) -> None:
        for layer in self.layers.values():
            for p in list(layer.As) + list(layer.Bs):
                p.requires_grad_(False)
            if layer.R_delta is not None:
                layer.R_delta.requires_grad_(False)
