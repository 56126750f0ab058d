"""``olora`` (O-LoRA, Wang et al. 2023): a new rank-r branch per task, old branches frozen, plus

    loss += λ1 · Σ_modules Σ_{old i} Σ |A_i A_newᵀ|        (λ1 = ``olora_lambda``, default 0.5)

No task id at inference: all branches are summed, so the served adapter is one PEFT LoRA whose A and B are the
branches concatenated along the rank (rank n·r, same scale).
"""

from __future__ import annotations

import torch
from torch import nn

from . import register_method
from .base import Method


def orthogonality_loss(layers: dict, lam: float) -> torch.Tensor | None:
    """λ Σ over modules of Σ|A_old A_newᵀ| where the newest branch is the last one; None with one branch."""
    terms = []
    for layer in layers.values():
        if len(layer.As) < 2:
            continue
        A_new = layer.As[-1]  # (r, in)
        A_old = torch.cat(list(layer.As)[:-1], 0).detach()  # (R_old, in)
        terms.append((A_old @ A_new.t()).abs().sum())
    if not terms or lam == 0:
        return None
    return lam * torch.stack(terms).sum()


@register_method("olora")
class OLoRA(Method):
    def begin_task(self, t: int) -> list[nn.Parameter]:
        self.freeze_all()
        params = []
        for layer in self.layers.values():
            i = layer.add_branch(self.cfg.rank, self.gen)
            params += [layer.As[i], layer.Bs[i]]
        return params

    def penalty(self) -> torch.Tensor | None:
        return orthogonality_loss(self.layers, self.cfg.olora_lambda)
