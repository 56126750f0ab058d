"""Frozen base linears with their weights pre-packed for oneDNN, for bf16 inference on CPU.

``F.linear`` on CPU re-packs the weight matrix on every call; for the few rows of a decode step (or a short
prompt) that packing costs as much as the product itself. A frozen layer can pack once: ``PackedLinear`` keeps
the oneDNN-packed weight (``torch.ops.mkldnn._reorder_linear_weight``) and runs ``_linear_pointwise`` on it.
Measured on the 2-core bf16 CPU: a 1536x576 product of 4 rows drops from about 150 to 90 us.

The ops are the ones PyTorch's own CPU compiler uses; they are private, so ``pack_linear`` only swaps a layer
after checking, on that layer, that the op exists and gives the same product as ``F.linear``, and leaves
everything as it was otherwise (float32, CUDA, or a torch without the ops). Inference only: no autograd.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


@functools.cache
def _ops_available() -> bool:
    mk = getattr(torch.ops, "mkldnn", None)
    try:
        return (mk is not None and torch.backends.mkldnn.is_available()
                and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))
    except (AttributeError, RuntimeError):
        return False


def packable(linear: nn.Module) -> bool:
    """A plain bf16 ``nn.Linear`` on CPU (the only case packing is known to pay off)."""
    return (type(linear) is nn.Linear and linear.weight.device.type == "cpu"
            and linear.weight.dtype == torch.bfloat16 and _ops_available())


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight (out, in)`` in oneDNN's packed layout, for ``packed_linear``."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach())


def packed_linear(x: torch.Tensor, packed: torch.Tensor, out_features: int,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x (..., in) @ Wᵀ (+ b) -> (..., out)`` for a weight packed by ``pack_weight``."""
    lead = x.shape[:-1]
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), packed, bias, "none", [], "")  # (M, out)
    return y.view(*lead, out_features)


class PackedLinear(nn.Module):
    """``y = x Wᵀ + b`` with ``W`` packed once; same shapes and dtype as the ``nn.Linear`` it replaces.

    ``keep_weight`` keeps the plain weight too (a tied embedding shares it, so that costs nothing); otherwise
    ``weight`` is the packed tensor, which still reports the shape, dtype and device HF code may read."""

    def __init__(self, linear: nn.Linear, keep_weight: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.plain = linear.weight if keep_weight else None  # the same Parameter: no copy of its storage
        self.bias = linear.bias
        self.register_buffer("packed", pack_weight(linear.weight), persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.plain if self.plain is not None else self.packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.packed, self.out_features, self.bias)


def _agrees(linear: nn.Linear, packed: PackedLinear) -> bool:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, linear.in_features, generator=g).to(linear.weight.dtype)
    with torch.inference_mode():
        want = nn.functional.linear(x, linear.weight, linear.bias).float()
        got = packed(x).float()
    return got.shape == want.shape and bool(torch.allclose(got, want, rtol=2e-2, atol=2e-2))


def pack_linear(linear: nn.Module, keep_weight: bool = False) -> nn.Module:
    """``linear`` packed when that is possible and checked to agree, else ``linear`` itself."""
    if not packable(linear):
        return linear
    try:
        packed = PackedLinear(linear, keep_weight)  # type: ignore[arg-type]
        if _agrees(linear, packed):  # type: ignore[arg-type]
            return packed
        log.warning("packed product disagrees with F.linear for %s; keeping the plain layer", tuple(linear.weight.shape))
    except RuntimeError as e:
        log.info("weight packing unavailable (%s); keeping plain linear layers", e)
    return linear


def pack_model_linears(model: nn.Module) -> int:
    """Swap every packable ``nn.Linear`` of ``model`` (decoder layers, lm_head) for a ``PackedLinear``.

    A plain weight goes away with its module unless another module shares it (tied embeddings), so memory
    grows only by the packed copy of a shared weight. Returns how many layers were packed."""
    users: dict[int, int] = {}
    for mod in model.modules():
        for p in mod.parameters(recurse=False):
            users[id(p)] = users.get(id(p), 0) + 1
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                new = pack_linear(child, keep_weight=users.get(id(child.weight), 0) > 1)
                if new is not child:
                    setattr(parent, name, new)
                    n += 1
    return n
