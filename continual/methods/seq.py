"""``seq``: one LoRA fine-tuned through all tasks in turn (the forgetting baseline)."""

from __future__ import annotations

import torch
from torch import nn

from . import register_method
from .base import Method


@register_method("seq")
class Sequential(Method):
    def begin_task(self, t: int) -> list[nn.Parameter]:
        if t == 0 or not any(len(layer.As) for layer in self.layers.values()):
            return self.reset_single_branch()
        params = []
        for layer in self.layers.values():
            for p in (layer.As[0], layer.Bs[0]):
                p.requires_grad_(True)
                params.append(p)
        return params

    def shared_params(self) -> dict[str, torch.Tensor]:
        out = {}
        for path, layer in self.layers.items():
            out[f"{path}.A"] = layer.As[0]
            out[f"{path}.B"] = layer.Bs[0]
        return out
