"""Elastic weight consolidation on the parameters a method shares across tasks (``Method.shared_params``).

penalty = λ/2 · Σ F (θ − θ*)², with F the diagonal Fisher (mean squared gradient of the training loss) summed
over finished tasks and θ* the values at the end of the last task.
"""

from __future__ import annotations

import torch


class EWC:
    def __init__(self, lam: float) -> None:
        self.lam = lam
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}

    def penalty(self, params: dict[str, torch.Tensor]) -> torch.Tensor | None:
        if self.lam == 0 or not self.fisher:
            return None
        terms = [(self.fisher[k] * (p - self.anchor[k]).pow(2)).sum() for k, p in params.items() if k in self.fisher]
        return 0.5 * self.lam * torch.stack(terms).sum() if terms else None

    def consolidate(self, params: dict[str, torch.Tensor], sq_grads: dict[str, torch.Tensor], n: int) -> None:
        for k, p in params.items():
            f = sq_grads[k] / max(n, 1)
            self.fisher[k] = self.fisher[k] + f if k in self.fisher else f
            self.anchor[k] = p.detach().clone()

    def state(self) -> dict[str, torch.Tensor]:
        out = {f"ewc.fisher.{k}": v for k, v in self.fisher.items()}
        out.update({f"ewc.anchor.{k}": v for k, v in self.anchor.items()})
        return out

    def load(self, tensors: dict[str, torch.Tensor], device: torch.device) -> None:
        self.fisher = {k[len("ewc.fisher."):]: v.to(device) for k, v in tensors.items() if k.startswith("ewc.fisher.")}
        self.anchor = {k[len("ewc.anchor."):]: v.to(device) for k, v in tensors.items() if k.startswith("ewc.anchor.")}
