"""The LoRA term on oneDNN-packed bf16 weights, and q/k/v as one product, for CPU inference.

With the base linears packed (base_model/packed_linear.py), a mixed decode step spends most of its extra time in the
LoRA term's small ops: cast, shrink, mask, expand, cast and add, for every wrapped layer. oneDNN's linear
takes one elementwise post-op, so the term becomes two ops on packed copies of the batch's gathered slots:

    h = (x @ A_uᵀ) ⊙ mask      # post-op "mul": (M, Σ rank)
    y = h @ B_u + y             # post-op "add": (M, out)

Layers that read the same input (q, k and v) share them: their gathered A are stacked into one shrink, their
B form one block-diagonal expand, and their base weights one packed matrix, so the three projections with
their adapters cost three ops instead of twenty-one. ``FusedQKV`` does that; the runner calls it when an
attention module carries one.

The gathered copies are rebuilt when the batch's slot layout or a slot changes (layers version their slots),
and packed once that layout has lasted a few forwards (``PACK_AFTER``); between those, every step reuses them.
A prefill on several adapters runs row by row instead (``LoraBatch.per_row``): batched matmuls over per-row
copies of the slots' weights, stacked once per layout (lora_layers.stack_slots), so no row pays for other
slots' ranks. Measured on SmolLM2, prompts of 64 tokens, 8 adapters (r 8 and 16), base / mask / per-slot
segments (the previous way) / per row, ms: 15 rows 703 / 832 / 767 / 727; 8 rows 428 / 498 / 521 / 467;
3 rows 154 / 182 / 194 / 169.
A term of few tokens (``KERNEL_MAX_TOKENS``: a decode step, a short prompt) goes to the compiled kernel when there is
one (lora_kernel.py): every token on its own slot's ranks only, read from the pools in place. Without it, a term of
few tokens on few ranks (``SMALL_TERM``: one stream's decode step, a short prompt's prefill on one adapter) runs as
two float32 BLAS products on transposed copies instead, kept like the others: oneDNN's fixed cost per call
outweighs such products.
bf16 on CPU only; everything else keeps the plain path.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch
from torch import nn

from base_model.packed_linear import PackedLinear, pack_model_linears, pack_weight, packable, packed_linear

from .lora_kernel import KERNEL_MAX_TOKENS, KernelBatch, KernelWeights, LoraKernel
from .lora_layers import LoraBatch, SlotLoRALinear, per_row_term, stack_slots
from .packed_mlp import fuse_mlp

# Forwards on one slot layout before its gathered copies are packed. oneDNN takes plain weights too: packing a
# term's two copies costs about 350 us, and saves 5 to 25 us per forward (16 rows: 78 against 99 us for q/k/v),
# so a layout that lasts a request's decode is packed, and a new adapter's first forwards do not wait for it.
PACK_AFTER = 8
# Layouts whose copies are kept: the running decode batch's, and the few that prefills of new rows bring in
# between its steps (with one, every prefill would throw the decode layout's packed copies away).
KEPT_LAYOUTS = 3
# A term this small (token rows x gathered rank columns) runs as two float32 BLAS products instead: oneDNN's calls
# cost 20-40 us each however small the product. Measured per term, packed / float32, us: 1 row, r 16 on q/k/v
# (48 columns) 40 / 14; 4 rows, 48 columns 63 / 40; 16 rows, 16 columns 42 / 26; 8 rows, 96 columns 64 / 59;
# 32 rows, 48 columns 68 / 79; 16 rows, 288 columns (a decode step on 8 adapters) 146 / 317. So a single
# stream's decode step and a short prompt's prefill on one adapter go this way, a mixed batch's step does not.
SMALL_TERM = 512
# Layouts whose per-row stacks (prefills on several adapters) are kept: a closed loop of waves prefills on
# the same slots every wave. Each holds U x n x max rank x (in + Σ out) values in bf16: 44 MB for SmolLM2's
# q/k/v/o over 8 slots of r 16, 177 MB of r 64. A miss rebuilds them: 23 ms over 8 slots of r 8/16 (the mask's
# gather of the same layout: about 15).
KEPT_STACKS = 2


def _linear_then(x2: torch.Tensor, other: torch.Tensor, packed: torch.Tensor, op: str) -> torch.Tensor:
    """``(x2 @ Wᵀ) op other`` in one oneDNN call; ``op`` is "mul" or "add", ``other`` has the output's shape."""
    return torch.ops.mkldnn._linear_pointwise.binary(x2, other, packed, None, op)


class PackedLoraTerm:
    """The LoRA term of ``layers`` (all reading one input) as one shrink and one expand on oneDNN.

    ``__call__(x, y)`` adds every layer's term to ``y``, whose last dimension is the layers' outputs side by
    side, and returns the sum: ``y`` updated in place by the kernel (a term of at most ``KERNEL_MAX_TOKENS``
    tokens), a new tensor otherwise. ``y`` is the base product's fresh output, which nothing else holds."""

    def __init__(self, layers: list[SlotLoRALinear], kernel: LoraKernel | None = None) -> None:
        assert layers and len({layer.in_features for layer in layers}) == 1
        self.layers = layers
        self.kernel = kernel
        self.kernel_weights = KernelWeights.of(layers) if kernel is not None else None
        self.batch: LoraBatch = layers[0].batch
        self.outs = [layer.out_features for layer in layers]
        self._copies: OrderedDict[tuple, list] = OrderedDict()  # layout key -> [A, B, forwards], LRU order
        self._stacks: OrderedDict[tuple, list] = OrderedDict()  # layout key -> [At, Bt, forwards]: per-row form
        self._small: OrderedDict[tuple, list] = OrderedDict()  # layout key -> [Aᵀ, Bᵀ, forwards] in float32

    def _weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The gathered copies of the batch's slot layout."""
        b = self.batch
        return self._kept(self._copies, b.layout, KEPT_LAYOUTS, self._gather)

    def _small_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The gathered copies transposed, in float32: ``Aᵀ (in, n·S)``, ``Bᵀ (n·S, Σ out)`` (for ``SMALL_TERM``)."""
        return self._kept(self._small, self.batch.layout, KEPT_LAYOUTS, self._gather_transposed, pack=False)

    def _gather_transposed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``_gather``'s copies as the float32 products read them: ``Aᵀ (in, n·S)``, a transposed view (BLAS reads
        either order), and ``Bᵀ (n·S, Σ out)``, made block diagonal as it is. A new adapter's first forward (a
        hot-registered one's first token) makes these for every layer, so they take few ops."""
        Bt = torch.block_diag(*[self.batch.rank_rows(layer.Bs) for layer in self.layers])
        return self._stacked_A().float().T, Bt.float()

    def _stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's slots one by one (``stack_slots``), for a prefill on several adapters."""
        b = self.batch
        stack = lambda: stack_slots(self.layers, b, self.layers[0].A.dtype)  # noqa: E731
        return self._kept(self._stacks, b.layout, KEPT_STACKS, stack, pack=False)

    def _kept(self, cache: OrderedDict, key: tuple, keep: int, gather: Callable[[], tuple[torch.Tensor, torch.Tensor]],
              pack: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The copies under ``key`` (and the layers' slot versions), gathered on a miss; ``keep`` entries at most;
        packed for oneDNN once they have lasted (``pack``)."""
        key = (key, tuple(layer._version for layer in self.layers))
        entry = cache.get(key)
        if entry is None:
            entry = cache[key] = [*gather(), 0]
            if len(cache) > keep:
                cache.popitem(last=False)
        cache.move_to_end(key)
        entry[2] += 1
        if pack and entry[2] == PACK_AFTER:  # the copies have lasted: pack them
            entry[0], entry[1] = pack_weight(entry[0]), pack_weight(entry[1])
        return entry[0], entry[1]

    def _stacked_A(self) -> torch.Tensor:
        """The layers' ``A_u`` stacked: ``(n·S, in)`` (S: the batch's total rank)."""
        return torch.cat([self.batch.rank_rows(layer.A) for layer in self.layers])

    def _gather(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The layers' gathered ``A_u`` stacked, ``(n·S, in)``, and their ``B_u`` block diagonal, as a linear weight
        ``(Σ out, n·S)``: written transposed into place (8 slots: 30 q/k/v terms in 9-12 ms, against 17-23 for a
        ``block_diag`` transposed afterwards)."""
        b, S = self.batch, self.batch.total_rank
        A = self._stacked_A()
        B = A.new_zeros(sum(self.outs), len(self.layers) * S)
        row = 0
        for j, (layer, out) in enumerate(zip(self.layers, self.outs)):
            B[row: row + out, j * S: (j + 1) * S] = b.rank_rows(layer.Bs).T
            row += out
        return A, B

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        *lead, d = x.shape
        T = x.shape[1] if x.dim() == 3 else 1
        x2, y2 = x.reshape(-1, d), y.reshape(-1, y.shape[-1])
        if self.kernel is not None and x2.shape[0] <= KERNEL_MAX_TOKENS:
            y2 = y2.contiguous()  # y itself, as a rule: the fresh output of the base product
            self.kernel.add_term(x2.contiguous(), y2, T, self.kernel_weights, KernelBatch.of(self.batch))
            return y2.view(*lead, y.shape[-1])
        if self.batch.per_row:  # x (N, T, in)
            At, Bt = self._stacked()
            return per_row_term(x, y.view(*lead, -1), At, Bt, self.batch, len(self.layers)).view(y.shape)
        n = len(self.layers)
        if x2.shape[0] * n * self.batch.total_rank <= SMALL_TERM:
            At, Bt = self._small_weights()
            h = torch.mm(x2.float(), At).mul_(self.batch.flat_mask(T, n, torch.float32))  # (M, n·S)
            return torch.addmm(y2.float(), h, Bt).to(y.dtype).view(*lead, y.shape[-1])
        A, B = self._weights()
        mask = self.batch.flat_mask(T, n, x.dtype)  # (M, n·S)
        assert mask.shape[0] == x2.shape[0], f"mask rows {mask.shape[0]} vs tokens {x2.shape[0]}"
        h = _linear_then(x2, mask, A, "mul")  # (M, n·S)
        return _linear_then(h, y2, B, "add").view(*lead, y.shape[-1])


class FusedQKV(nn.Module):
    """q, k and v of one attention module as one packed product plus one LoRA term (``PackedLoraTerm``).

    Built from the three projections (each an ``nn.Linear`` or a ``SlotLoRALinear`` around one) before they
    are packed; they stay in place, so code that calls them one by one still works."""

    def __init__(self, q: nn.Module, k: nn.Module, v: nn.Module, kernel: LoraKernel | None = None) -> None:
        super().__init__()
        parts = [q, k, v]
        bases = [p.base if isinstance(p, SlotLoRALinear) else p for p in parts]
        self.sizes = [b.out_features for b in bases]
        self.register_buffer("packed", pack_weight(torch.cat([b.weight for b in bases])), persistent=False)
        biases = [b.bias for b in bases]
        self.bias = (None if all(x is None for x in biases) else torch.cat(
            [x if x is not None else bases[0].weight.new_zeros(n) for x, n in zip(biases, self.sizes)]))
        self.lora = [p for p in parts if isinstance(p, SlotLoRALinear)]
        self.term = PackedLoraTerm(self.lora, kernel) if len(self.lora) == 3 else None

    def joint(self, x: torch.Tensor) -> torch.Tensor:
        """q, k and v side by side: (N, T, q + k + v) for ``x (N, T, in)``."""
        *lead, d = x.shape
        y = packed_linear(x.reshape(-1, d), self.packed, sum(self.sizes), self.bias)  # (M, q + k + v)
        if self.term is not None and any(layer.active() for layer in self.lora):
            y = self.term(x, y)
        return y.view(*lead, -1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.joint(x).split(self.sizes, dim=-1))


def _fusable(attn: nn.Module) -> bool:
    parts = [getattr(attn, name, None) for name in ("q_proj", "k_proj", "v_proj")]
    bases = [p.base if isinstance(p, SlotLoRALinear) else p for p in parts]
    kinds = {type(p) for p in parts}
    return (all(b is not None and packable(b) for b in bases) and len(kinds) == 1
            and len({b.in_features for b in bases}) == 1)


def pack_for_cpu(model: nn.Module, layers: dict[str, SlotLoRALinear],
                 kernel: LoraKernel | None = None) -> tuple[int, int, int]:
    """Fuse each attention's q/k/v (while their plain weights exist), pack every packable base linear, give the
    wrapped layers whose base got packed the packed LoRA term, and fuse each gated MLP's products with its
    activation and residual (packed_mlp.py). Returns (packed linears, fused attentions, fused MLPs); (0, 0, 0)
    leaves the model as it was (float32, CUDA, or no oneDNN bf16)."""
    fused = 0
    for module in list(model.modules()):
        if all(hasattr(module, n) for n in ("q_proj", "k_proj", "v_proj")) and _fusable(module):
            module.fused_qkv = FusedQKV(module.q_proj, module.k_proj, module.v_proj, kernel)
            fused += 1
    packed = pack_model_linears(model)
    for layer in layers.values():
        if isinstance(layer.base, PackedLinear):
            layer.packed_term = PackedLoraTerm([layer], kernel)
    mlps = 0
    for module in list(model.modules()):
        if all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj")):
            module.fused_mlp = fuse_mlp(module)
            mlps += module.fused_mlp is not None
    return packed, fused, mlps
