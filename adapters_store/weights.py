"""Slot-ready adapter tensors: the one thing every adapter kind produces and the engine consumes."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Protocol

import torch


@dataclass(frozen=True)
class LoraPair:
    """One module's low-rank update: ΔW = scale · B @ A, with A (r, in) and B (out, r)."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float

    def __post_init__(self) -> None:
        assert self.A.dim() == 2 and self.B.dim() == 2, "A and B must be matrices"
        assert self.A.shape[0] == self.B.shape[1], f"rank mismatch: A {tuple(self.A.shape)} B {tuple(self.B.shape)}"

    def slot_form(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """What a compute slot stores: ``A (r, in)`` and ``Bs = scale · Bᵀ (r, out)``, both contiguous ``dtype``."""
        A = self.A.to(dtype).contiguous()
        Bs = torch.empty(self.B.shape[1], self.B.shape[0], dtype=torch.float32, device=self.B.device)
        Bs.copy_(self.B.T).mul_(self.scale)  # (r, out): one copy, scaled in place in float32
        return A, Bs.to(dtype)


SlotGroup = tuple[tuple[str, ...], torch.Tensor, torch.Tensor]
"""Same-shaped modules' paths and their slot forms stacked in that order: ``A (n, r, in)``, ``Bs (n, r, out)``."""


class Gate(Protocol):
    """Per-request branch weights of a gated adapter (GainLoRA): mean prompt embedding (H,) -> (n_branches,)."""

    def __call__(self, pooled: torch.Tensor) -> torch.Tensor: ...


@dataclass
class AdapterWeights:
    """Everything the engine needs to put one adapter version into a compute slot.

    ``modules`` maps a module path of the base model (``model.layers.0.self_attn.q_proj``) to its update.
    Gated kinds concatenate their branches along the rank dimension; ``segments`` gives each branch's rank
    (in order) and ``gate`` computes the per-request weight of each branch.
    """

    kind: str
    rank: int
    modules: dict[str, LoraPair]
    segments: tuple[int, ...] = ()
    gate: Gate | None = None
    meta: dict = field(default_factory=dict)
    _slot_forms: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.segments:
            assert sum(self.segments) == self.rank, "segments must add up to the rank"
            assert self.gate is not None, "a segmented adapter needs a gate"

    @property
    def target_modules(self) -> set[str]:
        return {path.rsplit(".", 1)[-1] for path in self.modules}

    def slot_ready(self, dtype: torch.dtype) -> list[SlotGroup]:
        """Every module's ``LoraPair.slot_form(dtype)``, stacked by groups of same-shaped modules, computed once per
        dtype (the registry warms it off the engine thread, so putting the adapter in a slot is a plain copy)."""
        ready = self._slot_forms.get(dtype)
        if ready is None:
            ready = self._slot_forms[dtype] = list(_slot_groups(self.modules, dtype))
        return ready

    def converted(self, dtype: torch.dtype) -> list[SlotGroup] | None:
        """``slot_ready(dtype)`` if it has been computed, else None (computing nothing)."""
        return self._slot_forms.get(dtype)

    def slot_groups(self, dtype: torch.dtype, scratch: "Scratch | None" = None) -> Iterable[SlotGroup]:
        """``slot_ready(dtype)`` when it has been computed, else converted here group by group, nothing kept: into
        ``scratch`` when given, where each group's tensors last until the next group is taken."""
        return self.converted(dtype) or _slot_groups(self.modules, dtype, scratch)

    def nbytes(self) -> int:
        return sum(p.A.numel() * p.A.element_size() + p.B.numel() * p.B.element_size() for p in self.modules.values())


class Scratch:
    """Memory reused from one conversion to the next, for results that are consumed at once (copied into a compute
    slot). A fresh tensor of a few MB is fresh pages from the OS, and faulting them in cost more than the copies:
    in the server (2 cores, SmolLM2, r 16 on q/k/v/o) converting a new adapter as it was written took 4-14 ms of
    CPU, and 33-48 ms for the first few, against about 1 ms for the copies of one already converted."""

    def __init__(self) -> None:
        self._buf = torch.empty(0, dtype=torch.uint8)
        self._used = 0

    def reset(self) -> None:
        """Hand out the memory from the start again: what was handed out before must be done with."""
        self._used = 0

    def __call__(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        start = -(-self._used // 64) * 64
        end = start + math.prod(shape) * dtype.itemsize
        if end > self._buf.numel():  # grow to the largest group yet; what was handed out keeps the old buffer
            self._buf, start, end = torch.empty(end, dtype=torch.uint8), 0, end - start
        self._used = end
        return self._buf[start:end].view(dtype).view(shape)


def _fresh(device: torch.device) -> Callable[[tuple[int, ...], torch.dtype], torch.Tensor]:
    return lambda shape, dtype: torch.empty(shape, dtype=dtype, device=device)


def _slot_groups(modules: dict[str, LoraPair], dtype: torch.dtype, scratch: Scratch | None = None) -> Iterator[SlotGroup]:
    """``LoraPair.slot_form`` for every module, a few ops per group of same-shaped modules instead of five per
    module (SmolLM2, r 16 on q/k/v/o: 120 modules in 3 groups, 3.0-3.8 ms down to 1.1-1.3): contiguous stacks
    whose rows equal ``slot_form``'s, group by group (into ``scratch``, reset per group, when given)."""
    groups: dict[tuple, list[str]] = {}
    for path, pair in modules.items():
        key = (tuple(pair.A.shape), tuple(pair.B.shape), pair.A.dtype, pair.B.dtype, pair.A.device)
        groups.setdefault(key, []).append(path)
    for paths in groups.values():
        pairs = [modules[p] for p in paths]
        (r, n_in), n_out, dev = pairs[0].A.shape, pairs[0].B.shape[0], pairs[0].A.device
        empty = scratch if scratch is not None and dev.type == "cpu" else _fresh(dev)
        if empty is scratch:
            scratch.reset()
        A = torch.stack([p.A for p in pairs], out=empty((len(pairs), r, n_in), pairs[0].A.dtype))
        if A.dtype != dtype:
            A = empty(A.shape, dtype).copy_(A)
        B = torch.stack([p.B for p in pairs], out=empty((len(pairs), n_out, r), pairs[0].B.dtype))  # (n, out, r)
        scale = torch.tensor([p.scale for p in pairs], dtype=torch.float32, device=dev).view(-1, 1, 1)
        Bs = empty((len(pairs), r, n_out), torch.float32).copy_(B.transpose(1, 2)).mul_(scale)  # (n, r, out)
        yield tuple(paths), A, (Bs if dtype == torch.float32 else empty(Bs.shape, dtype).copy_(Bs))
