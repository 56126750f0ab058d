"""``clora``: C-LoRA as implemented here (no official code exists; the formulation is in docs/clora.md).

Per wrapped module one shared pair A (r, in), B (out, r) and an r x r routing matrix::

    ΔW_t = s · B (R_old + R_δ) A

* Task 0: R_old = I (frozen), R_δ = 0; A, B (PEFT init: B = 0) and R_δ train, so task 0 is a plain LoRA.
* After every task: fold R_old <- R_old + R_δ, R_δ <- 0, and grow two GPM memories over the task's training
  tokens (energy threshold 0.97 + 0.003 t): U (r, k) of u = A x in the rank space, and U_x (in, k_x) of the
  module's inputs x. This fold is the exported version.
* Tasks t >= 1: R_δ trains (from zero, at ``routing_lr``, default the LoRA's) with the penalty
  ``clora_lambda · Σ_modules ||R_δ U||_F²`` that keeps R_δ off the directions old tasks use. With
  ``clora_project_a`` A trains too, its change since the task began projected off U_x after every step
  (gradient and parameter), so A x is unchanged for old inputs x in span(U_x); without it A is frozen.
  With ``clora_project_b`` B trains too, its change since the task began projected off V = orth(R_old U), the
  codes old tasks feed it (gradient and parameter): (B - B_start) R_old u = 0 for u in span(U); without it B is
  frozen after task 0, and every task's output goes through task 0's column space of B.

Guarantees (tested): at the start of every task the model equals the previous version (R_δ = 0); for any input
x in span(U_x) with A x in span(U), ΔW_t x = ΔW_{t-1} x whenever R_δ U = 0 (B's change vanishes on R_old U), so
the penalty bounds the drift on old inputs by s·||B||·||R_δ U||·||A x||. One adapter, nothing added per task:
the served version is a PEFT LoRA with B' = B (R_old + R_δ).
"""

from __future__ import annotations

import torch
from torch import nn

from ..gpm import Projected, gpm_threshold, gpm_update_cov, keep_changes_off, project_off
from . import register_method
from .base import Method


@register_method("clora")
class CLoRA(Method):
    wants_memory = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.bases: dict[str, torch.Tensor] = {}  # path -> U (r, k) of old tasks' u = A x
        self.input_bases: dict[str, torch.Tensor] = {}  # path -> U_x (in, k_x) of old tasks' inputs x
        # (A or B, its value at the task's start, the basis its change stays off): what trains projected (t >= 1)
        self._projected: list[Projected] = []

    def begin_task(self, t: int) -> list[nn.Parameter]:
        r = self.cfg.rank
        params: list[nn.Parameter] = []
        if t == 0 or not any(len(layer.As) for layer in self.layers.values()):
            params = self.reset_single_branch()
            for layer in self.layers.values():
                layer.R_old = torch.eye(r, device=self.device)
        self._projected = [(w, w.detach().clone(), basis) for w, basis in self._projections(t)]
        trained = {id(w) for w, _, _ in self._projected}
        for layer in self.layers.values():
            for w in (layer.As[0], layer.Bs[0]):
                w.requires_grad_(t == 0 or id(w) in trained)
                if id(w) in trained:
                    params.append(w)
            layer.R_delta = nn.Parameter(torch.zeros(r, r, device=self.device))
            params.append(layer.R_delta)
        return params

    def _projections(self, t: int) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """The factors task ``t`` trains besides R_δ, each with the basis its change stays off: A off the old tasks'
        inputs U_x, only where a basis covering every old task exists (a run resumed from a checkpoint written
        without ``clora_project_a`` has none, so its A stays frozen as it was trained); B off the old codes
        V = orth(R_old U), only where some code direction is free."""
        out: list[tuple[nn.Parameter, torch.Tensor]] = []
        if t == 0:
            return out
        for path, layer in self.layers.items():
            if self.cfg.clora_project_a and path in self.input_bases:
                out.append((layer.As[0], self.input_bases[path]))
            V = _old_codes(layer.R_old, self.bases.get(path)) if self.cfg.clora_project_b else None
            if V is not None and V.shape[1] < layer.R_old.shape[0]:
                out.append((layer.Bs[0], V.to(self.device)))
        return out

    def param_groups(self, params: list[nn.Parameter]) -> list[dict]:
        routing = [layer.R_delta for layer in self.layers.values()]
        return self.own_lr_groups(params, routing, self.cfg.routing_lr or self.cfg.lr)

    def penalty(self) -> torch.Tensor | None:
        if not self.bases or self.cfg.clora_lambda == 0:
            return None
        terms = [(layer.R_delta @ self.bases[p].to(layer.R_delta.device)).pow(2).sum()
                 for p, layer in self.layers.items() if p in self.bases]
        return self.cfg.clora_lambda * torch.stack(terms).sum()

    def overlap(self) -> float:
        """Σ ||R_δ U||_F² over modules: how much the current increment acts on old tasks' subspace."""
        with torch.no_grad():
            return float(sum((l.R_delta @ self.bases[p].to(l.R_delta.device)).pow(2).sum()
                             for p, l in self.layers.items() if p in self.bases and l.R_delta is not None))

    @torch.no_grad()
    def after_backward(self) -> None:
        """Project the gradients of A and B off their bases (keeps Adam's moments off them too)."""
        for w, _, basis in self._projected:
            if w.grad is not None:
                w.grad.copy_(project_off(w.grad, basis))

    def after_step(self) -> None:
        """Keep A's and B's changes since the task began off their bases (Adam's step is not projected)."""
        keep_changes_off(self._projected)

    def end_task(self, t: int) -> None:
        """Fold R_δ into R_old; the GPM memories need the task's activations (the runner's memory pass)."""
        for layer in self.layers.values():
            layer.R_old = (layer.R_old + layer.R_delta.detach()).detach()
            layer.R_delta = nn.Parameter(torch.zeros_like(layer.R_old), requires_grad=False)
            layer.As[0].requires_grad_(False)
            layer.Bs[0].requires_grad_(False)

    def start_recording(self) -> None:
        for layer in self.layers.values():
            r = layer.As[0].shape[0]
            layer.record_cov = torch.zeros(r, r, device=self.device)
            if self.cfg.clora_project_a:
                layer.record_input_cov = torch.zeros(layer.in_features, layer.in_features, device=self.device)

    def finish_recording(self, t: int) -> None:
        for path, layer in self.layers.items():
            cov = layer.record_cov
            layer.record_cov = None
            self.bases[path] = gpm_update_cov(self.bases.get(path), cov, gpm_threshold(t)).cpu()
            if layer.record_input_cov is not None:
                x_cov, layer.record_input_cov = layer.record_input_cov, None
                if t == 0 or path in self.input_bases:  # a basis covers every old task or does not exist
                    self.input_bases[path] = gpm_update_cov(self.input_bases.get(path), x_cov, gpm_threshold(t))

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors, meta = super().state()
        for p, U in self.bases.items():
            tensors[f"gpm.{p}"] = U
        for p, U in self.input_bases.items():
            tensors[f"gpm_x.{p}"] = U
        return tensors, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        super().load_state(tensors, meta)
        self.bases = {k[len("gpm."):]: v for k, v in tensors.items() if k.startswith("gpm.")}
        self.input_bases = {k[len("gpm_x."):]: v.to(self.device) for k, v in tensors.items() if k.startswith("gpm_x.")}


def _old_codes(R_old: torch.Tensor, U: torch.Tensor | None) -> torch.Tensor | None:
    """Orthonormal basis (r, k) of span(R_old U): the codes old tasks' inputs feed B (None without a memory)."""
    if U is None:
        return None
    if U.shape[1] == 0:
        return U
    Q, S, _ = torch.linalg.svd(R_old.float().cpu() @ U.float().cpu(), full_matrices=False)
    return Q[:, S > S.max() * 1e-6].contiguous()
