"""The training-time LoRA mechanism: a wrapped ``nn.Linear`` with rank-concatenated branches.

For one wrapped module with branches i = 1..n (A_i (r_i, in), B_i (out, r_i)), optional per-row branch weights
g (B, n) and an optional r x r routing matrix R = R_old + R_delta (single-branch C-LoRA only)::

    y = W0 x + s * B_cat (g-expanded ⊙ (R A_cat x))

LoRA tensors are kept and computed in float32 whatever the base dtype; the update is cast back to the base
output's dtype before the sum. Policy (which branches train, what the gates are) lives in the method modules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class GateContext:
    """Shared by all wrapped layers of one model: per-row branch weights for the current batch, or None (all 1)."""

    weights: torch.Tensor | None = None  # (B, n) float32
    token_mask: torch.Tensor | None = None  # (B, T) bool: real (non-padding) tokens, used when recording


class LoraLinear(nn.Module):
    """``base`` (frozen nn.Linear) plus a list of LoRA branches; see the module docstring for the formula."""

    def __init__(self, base: nn.Linear, scale: float, ctx: GateContext) -> None:
        super().__init__()
        self.base = base
        self.scale = float(scale)
        self.ctx = ctx
        self.As = nn.ParameterList()
        self.Bs = nn.ParameterList()
        self.R_old: torch.Tensor | None = None  # (r, r) frozen routing (C-LoRA)
        self.R_delta: nn.Parameter | None = None  # (r, r) trainable routing increment (C-LoRA)
        self.enabled = True
        self.record_cov: torch.Tensor | None = None  # when set, forward adds uᵀu of u = A x over real tokens
        self.record_input_cov: torch.Tensor | None = None  # when set, forward adds xᵀx of the inputs x, likewise

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def ranks(self) -> list[int]:
        return [int(a.shape[0]) for a in self.As]

    def add_branch(self, r: int, generator: torch.Generator, init_b: str = "zeros") -> int:
        """Append a branch initialised like PEFT (A kaiming-uniform, B zero, or small random for ``init_b='randn'``)."""
        dev = self.base.weight.device
        A = torch.empty(r, self.in_features)
        bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform(a=sqrt(5)) on (r, in)
        A.uniform_(-bound, bound, generator=generator)
        if init_b == "zeros":
            B = torch.zeros(self.out_features, r)
        else:
            B = torch.randn(self.out_features, r, generator=generator) / math.sqrt(r)
        self.As.append(nn.Parameter(A.to(dev)))
        self.Bs.append(nn.Parameter(B.to(dev)))
        return len(self.As) - 1

    def clear(self) -> None:
        self.As = nn.ParameterList()
        self.Bs = nn.ParameterList()
        self.R_old = None
        self.R_delta = None

    def routing(self) -> torch.Tensor | None:
        if self.R_old is None:
            return None
        return self.R_old + self.R_delta if self.R_delta is not None else self.R_old  # (r, r)

    def _real_rows(self, t: torch.Tensor) -> torch.Tensor:
        """(N, d) float32 rows of ``t`` (B, T, d) at the real (non-padding) tokens of ``ctx.token_mask``."""
        m = self.ctx.token_mask
        t = t.detach().float()
        return t[m] if m is not None else t.reshape(-1, t.shape[-1])

    def delta_weight(self) -> torch.Tensor:
        """ΔW (out, in) with all gates 1, for tests and exports."""
        A = torch.cat(list(self.As), 0)
        B = torch.cat(list(self.Bs), 1)
        R = self.routing()
        if R is not None:
            return self.scale * B @ R @ A
        return self.scale * B @ A

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.enabled or len(self.As) == 0:
            return y
        A = torch.cat(list(self.As), 0)  # (R, in)
        B = torch.cat(list(self.Bs), 1)  # (out, R)
        u = x.to(A.dtype) @ A.t()  # (B, T, R)
        if self.record_cov is not None:
            rows = self._real_rows(u)
            self.record_cov += rows.t() @ rows  # (R, R)
        if self.record_input_cov is not None:
            rows = self._real_rows(x)
            self.record_input_cov += rows.t() @ rows  # (in, in)
        R = self.routing()
        if R is not None:
            assert len(self.As) == 1, "a routing matrix needs exactly one branch"
            u = u @ R.t()  # (B, T, r)
        g = self.ctx.weights
        if g is not None:
            assert g.shape == (x.shape[0], len(self.As)), f"gates {tuple(g.shape)} for {len(self.As)} branches"
            seg = torch.tensor(self.ranks, device=g.device)
            gexp = torch.repeat_interleave(g, seg, dim=1)  # (B, R)
            u = u * gexp[:, None, :].to(u.dtype)
        return y + (self.scale * (u @ B.t())).to(y.dtype)  # (B, T, out)


def attach_lora(model: nn.Module, target_modules: list[str], scale: float, ctx: GateContext) -> dict[str, LoraLinear]:
    """Wrap every ``nn.Linear`` whose last path component is in ``target_modules``; returns path -> layer.

    Paths are the base model's own (``model.layers.0.self_attn.q_proj``), as PEFT keys and the engine use them.
    """
    found: dict[str, LoraLinear] = {}
    for path, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and path.rsplit(".", 1)[-1] in target_modules:
            parent_path, _, child = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            wrapped = LoraLinear(module, scale, ctx)
            setattr(parent, child, wrapped)
            found[path] = wrapped
    if not found:
        raise ValueError(f"no nn.Linear named {target_modules} in the model")
    return found
