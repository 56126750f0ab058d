"""Batched multi-adapter LoRA: one wrapped linear layer serves every row of a mixed batch in one pass.

Mechanism only: layers know compute slots, nothing about adapter names. The slots share one pool of rank rows
per module, ``A (P + 1, in)`` and ``Bs (P + 1, out)`` where ``Bs = scale · Bᵀ`` (the LoRA scale is folded in);
slot ``s`` of rank r holds r of its rows, wherever the slot table (slots.py) put them, and every row no slot
holds is zero (so is the pool's last row, always: the padding row of ``stack_slots``). The pools of same-shaped
layers are rows of one tensor (``SharedPool``), so putting an adapter into a slot is one copy per shape.

For a batch, ``LoraBatch`` lists the distinct slots in use (``U`` of them, slot u of rank r_u) and a per-row
mask ``(N, Σ r_u)`` that is 1 on the row's own slot's columns (times a per-rank weight: the gate of a GainLoRA
branch), 0 elsewhere. The LoRA term for the whole batch is then two dense matmuls over the gathered slots, each
slot contributing only its own rank's rows (no padding to the largest rank):

    h = x @ A_uᵀ            # (N, T, Σ r_u)
    y = W0 x + (h ⊙ mask) @ Bs_u  # (N, T, out)

which is exact per row (the masked-out products are exact zeros) and costs no Python loop over adapters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence, TypeVar

import torch
from torch import nn

from adapters_store.weights import LoraPair

T_ = TypeVar("T_")


@dataclass
class LoraBatch:
    """Per-forward routing shared by every wrapped layer. Built once per engine step.

    ``uniq_list``: the U slots in use; ``spans[u]``: ``(first column, rank)`` of slot ``uniq_list[u]`` in the
    gathered rank space; ``slot_rows[u]``: its rows in the layers' pools; ``mask``: (N, 1, Σ rank) row mask.
    ``per_row``: the term runs row by row instead (BGMV-style: every row multiplied by its own slot's weights
    only, as batched matmuls over per-row copies of them; ``row_pos[i]`` is row i's index into ``uniq_list``,
    -1 for the base model): U times fewer flops than the mask for U slots, for a few more ops (prefill).
    """

    mask: torch.Tensor | None = None
    uniq_list: list[int] = field(default_factory=list)
    spans: list[tuple[int, int]] = field(default_factory=list)
    slot_rows: list[Sequence[int]] = field(default_factory=list)
    per_row: bool = False
    row_pos: list[int] = field(default_factory=list)
    layout: tuple = ()  # (slots, spans) as one hashable value: what the layers' gathered copies are keyed on
    _flat: dict[tuple, Any] = field(default_factory=dict)  # this step's masks, row indices and weights
    _rows: dict[tuple, torch.Tensor] = field(default_factory=dict)  # pool row indices of this layout
    _inputs: tuple = ()  # what the batch was built from (``build_lora_batch``), and the rows' rank weights
    _weights: list = field(default_factory=list)

    @property
    def active(self) -> bool:
        return bool(self.uniq_list)

    def clear(self) -> None:
        self.mask, self.uniq_list, self.spans, self.slot_rows, self.per_row = None, [], [], [], False
        self.row_pos, self.layout = [], ()
        self._flat, self._rows, self._inputs, self._weights = {}, {}, (), []

    def step_value(self, key: tuple, build: Callable[[], T_]) -> T_:
        """A value of this step's routing, built on first use (``build_lora_batch`` drops them)."""
        if key not in self._flat:
            self._flat[key] = build()
        return self._flat[key]

    def rank_rows(self, buf: torch.Tensor) -> torch.Tensor:
        """The rank rows of the batch's slots, side by side, from a layer's pool ``buf (P + 1, f)``: ``(Σ rank, f)``.
        One ``index_select`` (the row indices are built once per layout)."""
        idx = self._index("rows", buf.device, lambda: [r for rows in self.slot_rows for r in rows])
        return buf.index_select(0, idx)

    def stacked_rows(self, buf: torch.Tensor) -> torch.Tensor:
        """``(U, R, f)``: each slot's rows of ``buf``, padded to the batch's largest rank R with the pool's last
        row (zero): the per-row form of ``stack_slots``."""
        R = self.max_rank
        idx = self._index("stacked", buf.device, lambda: [r for rows in self.slot_rows
                                                          for r in [*rows, *[-1] * (R - len(rows))]])
        return buf[idx].view(len(self.slot_rows), R, buf.shape[1])  # -1: the last row

    def _index(self, kind: str, device: torch.device, rows: Callable[[], list[int]]) -> torch.Tensor:
        key = (kind, device)
        if key not in self._rows:
            self._rows[key] = torch.tensor(rows(), dtype=torch.long, device=device)
        return self._rows[key]

    @property
    def total_rank(self) -> int:
        return sum(r for _, r in self.spans)

    @property
    def max_rank(self) -> int:
        return max(r for _, r in self.spans)

    def row_index(self, device: torch.device) -> torch.Tensor:
        """``(N,)``: each row's index into ``uniq_list`` (0 for a base row, whose weights are all zero)."""
        return self.step_value(("rows", device), lambda: torch.tensor([max(u, 0) for u in self.row_pos],
                                                                       dtype=torch.long, device=device))

    def row_weights(self, copies: int, dtype: torch.dtype) -> torch.Tensor:
        """``(N, 1, copies·max_rank)``: row i's mask on its own slot's ranks, in each of ``copies`` blocks of
        ``max_rank`` columns (the layout of ``stack_slots``); zero past the slot's rank and on base rows."""
        assert self.mask is not None
        mask = self.mask

        def build() -> torch.Tensor:
            R = self.max_rank
            w = torch.zeros(len(self.row_pos), 1, copies, R, dtype=dtype, device=mask.device)
            for i, u in enumerate(self.row_pos):
                if u >= 0:
                    first, r = self.spans[u]
                    w[i, 0, :, :r] = mask[i, 0, first:first + r]
            return w.view(len(self.row_pos), 1, copies * R)

        return self.step_value(("row weights", copies, dtype), build)

    def flat_mask(self, T: int, copies: int, dtype: torch.dtype) -> torch.Tensor:
        """The mask as ``(N·T, copies·Σ rank)`` in ``dtype``: one row per token, repeated for layers that share
        one input (see packed_lora.py); built once per step and shape."""
        assert self.mask is not None
        mask = self.mask

        def build() -> torch.Tensor:
            N, _, S = mask.shape
            m = mask.to(dtype).expand(N, T, S).reshape(N * T, S)  # (N·T, S)
            return torch.cat([m] * copies, dim=1) if copies > 1 else m.contiguous()

        return self.step_value((T, copies, dtype), build)


def build_lora_batch(
    batch: LoraBatch,
    row_slots: list[int],
    row_rank_weights: list[torch.Tensor | None],
    slot_rows: Mapping[int, Sequence[int]],
    device: torch.device,
    dtype: torch.dtype,
    per_row: bool = False,
) -> None:
    """Fill ``batch`` for rows whose slots are ``row_slots`` (-1 = base model, no adapter); ``slot_rows[s]`` are
    slot s's rows in the layers' pools (one per rank).

    ``row_rank_weights[i]`` is an optional (rank,) weight per rank of row i's adapter (gates); None means ones.
    ``per_row`` asks for the row-by-row term (see ``LoraBatch``).
    """
    uniq_list = sorted({s for s in row_slots if s >= 0})
    if not uniq_list:
        batch.clear()
        return
    inputs = (tuple(row_slots), tuple(tuple(slot_rows[s]) for s in uniq_list), device, dtype, per_row)
    if inputs == batch._inputs and len(row_rank_weights) == len(batch._weights) and all(
            a is b for a, b in zip(row_rank_weights, batch._weights)):
        return  # the rows of the step before (a decode step between admissions): its masks and copies hold
    batch._inputs, batch._weights = inputs, list(row_rank_weights)
    spans, start = [], 0
    for s in uniq_list:
        spans.append((start, len(slot_rows[s])))
        start += len(slot_rows[s])
    pos = {s: i for i, s in enumerate(uniq_list)}
    mask = torch.zeros(len(row_slots), start, dtype=torch.float32)
    for i, (s, w) in enumerate(zip(row_slots, row_rank_weights)):
        if s < 0:
            continue
        first, r = spans[pos[s]]
        if w is None:
            mask[i, first: first + r] = 1.0
        else:
            mask[i, first: first + w.numel()] = w.float()
    if batch.layout != (tuple(uniq_list), tuple(spans)):
        batch._rows = {}
    batch.mask = mask.unsqueeze(1).to(device=device, dtype=dtype)
    batch._flat = {}
    batch.uniq_list = uniq_list
    batch.spans = spans
    batch.slot_rows = [slot_rows[s] for s in uniq_list]
    batch.layout = (tuple(uniq_list), tuple(spans))
    batch.per_row = per_row
    batch.row_pos = [pos.get(s, -1) for s in row_slots]


def stack_slots(layers: list[SlotLoRALinear], b: LoraBatch, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's slots of ``layers`` (all reading one input) one by one, for ``per_row_term``:
    ``At (U, in, n·R)``, layer j's ``A_sᵀ`` in columns ``j·R : (j + 1)·R``, and ``Bt (U, n·R, Σ out)``, block
    diagonal, layer j's ``Bs_s`` in those rows and its own output columns (R: the batch's largest rank; a slot's
    rows past its own rank are zero). Two copies per layer, whatever the number of slots."""
    R, first = b.max_rank, layers[0]
    At = torch.cat([b.stacked_rows(layer.A).transpose(1, 2) for layer in layers], dim=2).to(dtype)
    Bt = torch.zeros(len(b.uniq_list), len(layers) * R, sum(x.out_features for x in layers), dtype=dtype,
                     device=first.A.device)
    col = 0
    for j, layer in enumerate(layers):
        Bt[:, j * R: (j + 1) * R, col: col + layer.out_features] = b.stacked_rows(layer.Bs)
        col += layer.out_features
    return At, Bt


def per_row_term(x: torch.Tensor, y: torch.Tensor, At: torch.Tensor, Bt: torch.Tensor, b: LoraBatch,
                 copies: int) -> torch.Tensor:
    """``y_i + (x_i At_{u_i} ⊙ w_i) Bt_{u_i}`` for every row i at once: two batched matmuls over per-row copies
    of the stacks (``stack_slots``), computed in their dtype. ``x (N, T, in)``, ``y (N, T, Σ out)``; a new tensor."""
    idx = b.row_index(x.device)
    h = torch.bmm(x.to(At.dtype), At.index_select(0, idx)).mul_(b.row_weights(copies, At.dtype))  # (N, T, n·R)
    B = Bt.index_select(0, idx)  # (N, n·R, Σ out)
    return torch.baddbmm(y, h, B) if y.dtype == At.dtype else y + torch.bmm(h, B).to(y.dtype)


@dataclass(frozen=True, eq=False)
class SharedPool:
    """The pools of n same-shaped layers as one tensor each, ``A (n, P + 1, in)`` and ``Bs (n, P + 1, out)``, so
    that an adapter goes into (``write_slots``) or out of (``clear_slots``) a compute slot with one copy per group
    of same-shaped layers rather than two per layer (SmolLM2, r 16 on q/k/v/o: 4 copies instead of 240)."""

    A: torch.Tensor
    Bs: torch.Tensor

    @staticmethod
    def zeros(n: int, pool_rows: int, in_features: int, out_features: int, like: torch.Tensor) -> "SharedPool":
        return SharedPool(torch.zeros(n, pool_rows + 1, in_features, dtype=like.dtype, device=like.device),
                          torch.zeros(n, pool_rows + 1, out_features, dtype=like.dtype, device=like.device))

    def rows(self, layers: Sequence["SlotLoRALinear"], rows: Sequence[Sequence[int]]) -> torch.Tensor:
        """Indices into the flattened pools of each layer's ``rows`` (layers of this pool), in order."""
        n = self.A.shape[1]
        return torch.tensor([layer.shared[1] * n + r for layer, rs in zip(layers, rows) for r in rs],
                            dtype=torch.long, device=self.A.device)

    def put(self, flat: torch.Tensor, A: torch.Tensor, Bs: torch.Tensor) -> None:
        """Copy ``A (k, in)`` and ``Bs (k, out)`` to the flattened pools' rows ``flat`` (onto the GPU, if any)."""
        self.A.view(-1, self.A.shape[-1]).index_copy_(0, flat, A.to(self.A.device, self.A.dtype))
        self.Bs.view(-1, self.Bs.shape[-1]).index_copy_(0, flat, Bs.to(self.Bs.device, self.Bs.dtype))

    def zero(self, flat: torch.Tensor) -> None:
        self.A.view(-1, self.A.shape[-1]).index_fill_(0, flat, 0)
        self.Bs.view(-1, self.Bs.shape[-1]).index_fill_(0, flat, 0)


class SlotLoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a pool of ``pool_rows`` LoRA rank rows, which the compute slots share."""

    def __init__(self, base: nn.Linear, pool_rows: int, batch: LoraBatch, dtype: torch.dtype | None = None,
                 shared: tuple["SharedPool", int] | None = None) -> None:
        """The pool is stored in the base weight's dtype; ``dtype`` is the one the LoRA term is computed in (default:
        the same; see ``lora_dtype``). ``shared`` = (pool, i): this layer's pool is ``pool``'s i-th."""
        super().__init__()
        self.base = base
        self.batch = batch
        self.in_features, self.out_features = base.in_features, base.out_features
        w = base.weight
        self.compute_dtype = dtype or w.dtype
        self.shared = shared or (SharedPool.zeros(1, pool_rows, self.in_features, self.out_features, w), 0)
        pool, i = self.shared
        # one more row than the slots can take: always zero (padding)
        self.register_buffer("A", pool.A[i])  # (pool_rows + 1, in)
        self.register_buffer("Bs", pool.Bs[i])  # (pool_rows + 1, out)
        self.present: dict[int, list[int]] = {}  # slot -> the pool rows this module's update is written in
        self._version = 0  # bumped on every slot write: invalidates the copies below
        self._copies: dict[str, tuple[tuple, tuple[torch.Tensor, torch.Tensor]]] = {}  # kind -> (key, weights)
        self.packed_term: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None  # see packed_lora.py

    @property
    def weight(self) -> torch.Tensor:  # some HF code peeks at .weight (dtype/device)
        return self.base.weight

    def set_slot(self, slot: int, rows: Sequence[int], A: torch.Tensor, B: torch.Tensor, scale: float) -> None:
        """Write ``ΔW = scale · B @ A`` (A (r, in), B (out, r)) into ``slot``, at pool ``rows``."""
        A, Bs = LoraPair(A, B, scale).slot_form(self.A.dtype)
        write_slots([self], slot, rows, A[None], Bs[None])

    def gather(self, b: LoraBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """A_u (Σ rank, in) and B_u (Σ rank, out): the batch's slots side by side, in the slots' dtype."""
        return b.rank_rows(self.A), b.rank_rows(self.Bs)

    def _gathered(self) -> tuple[torch.Tensor, torch.Tensor]:
        A_u, B_u = self.gather(self.batch)
        return A_u.to(self.compute_dtype), B_u.to(self.compute_dtype)

    def _cached(self, kind: str,
                build: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's slots in the compute dtype as ``kind`` wants them; reused while the slot layout and the
        slots are unchanged."""
        key = (self.batch.layout, self._version)
        hit = self._copies.get(kind)
        if hit is None or hit[0] != key:
            hit = self._copies[kind] = (key, build())
        return hit[1]

    def active(self) -> bool:
        """Some slot of the current batch holds an update for this layer."""
        return any(s in self.present for s in self.batch.uniq_list)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (N, T, out)
        b = self.batch
        if not self.active():
            return y
        if self.packed_term is not None:
            return self.packed_term(x, y)
        if b.per_row:
            At, Bt = self._cached("rows", lambda: stack_slots([self], b, self.compute_dtype))
            return per_row_term(x, y, At, Bt, b, 1)
        A_u, B_u = self._cached("mask", self._gathered)  # (Σ rank, in), (Σ rank, out)
        h = torch.matmul(x.to(A_u.dtype), A_u.T) * b.mask  # (N, T, Σ rank)
        return y + torch.matmul(h, B_u).to(y.dtype)


def lora_dtype(device: torch.device, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype the unpacked LoRA term is computed in (packed_lora.py runs it in bf16 on oneDNN): float32 on
    CPU, where the tiny rank-r products cost about a third of their plain bf16 time (measured: 8 vs 25 us for
    4 x 576 @ 576 x 16); the model's elsewhere. Slots stay in the model's dtype (their memory: 8 slots of rank
    64 over SmolLM2's 210 linears are 312 MB in bf16)."""
    return torch.float32 if device.type == "cpu" else model_dtype


def wrap_lora_layers(
    model: nn.Module, target_modules: tuple[str, ...], pool_rows: int, dtype: torch.dtype | None = None,
) -> tuple[LoraBatch, dict[str, SlotLoRALinear]]:
    """Replace every ``nn.Linear`` named in ``target_modules`` (last name component) inside the decoder layers.

    Returns the shared ``LoraBatch`` and the wrapped layers keyed by their original module path.
    """
    batch = LoraBatch()
    targets = set(target_modules)
    found = [(f"{path}.{name}" if path else name, module, name, child)
             for path, module in list(model.named_modules()) for name, child in list(module.named_children())
             if name in targets and isinstance(child, nn.Linear) and ".layers." in f".{path}.{name}"]
    groups: dict[tuple[int, int], list[int]] = {}  # (in, out) -> indices into found: their pools are one tensor
    for k, (_, _, _, child) in enumerate(found):
        groups.setdefault((child.in_features, child.out_features), []).append(k)
    wrapped: dict[str, SlotLoRALinear] = {}
    for (n_in, n_out), ks in groups.items():
        pool = SharedPool.zeros(len(ks), pool_rows, n_in, n_out, found[ks[0]][3].weight)
        for i, k in enumerate(ks):
            full, module, name, child = found[k]
            wrapped[full] = SlotLoRALinear(child, pool_rows, batch, dtype, shared=(pool, i))
            setattr(module, name, wrapped[full])
    return batch, {full: wrapped[full] for full, *_ in found}  # in the model's order


def write_slots(layers: Sequence[SlotLoRALinear], slot: int, rows: Sequence[int], A: torch.Tensor,
                Bs: torch.Tensor) -> None:
    """Store ``A[i] (r, in)`` and ``Bs[i] = scale · Bᵀ (r, out)`` of every ``layers[i]`` in ``slot``'s pool ``rows``
    (r free rows, which are zero; never a pool's last): one copy of each per shared pool."""
    rows = [int(r) for r in rows]
    assert A.shape[0] == Bs.shape[0] == len(layers) and A.shape[1] == Bs.shape[1] == len(rows), \
        f"A {tuple(A.shape)}, Bs {tuple(Bs.shape)} for {len(layers)} layers and {len(rows)} rows"
    clear_slots(layers, slot)  # a rewrite: its old rows go back to zero first
    by_pool: dict[int, list[int]] = {}
    for k, layer in enumerate(layers):
        by_pool.setdefault(id(layer.shared[0]), []).append(k)
    for ks in by_pool.values():
        pool = layers[ks[0]].shared[0]
        a, bs = (A, Bs) if len(ks) == len(layers) else (A[ks], Bs[ks])
        assert a.shape[2] == pool.A.shape[2] and bs.shape[2] == pool.Bs.shape[2], \
            f"A {tuple(a.shape)}, Bs {tuple(bs.shape)} vs pools {tuple(pool.A.shape)}, {tuple(pool.Bs.shape)}"
        pool.put(pool.rows([layers[k] for k in ks], [rows] * len(ks)), a.reshape(-1, a.shape[-1]),
                 bs.reshape(-1, bs.shape[-1]))
    for layer in layers:
        layer.present[slot] = rows
        layer._version += 1


def clear_slots(layers: Sequence[SlotLoRALinear], slot: int) -> None:
    """Zero ``slot``'s rows in every layer that holds some of it: one fill of each shared pool."""
    held: dict[int, tuple[SharedPool, list[SlotLoRALinear], list[list[int]]]] = {}
    for layer in layers:
        rows = layer.present.pop(slot, None)
        if rows is not None:
            entry = held.setdefault(id(layer.shared[0]), (layer.shared[0], [], []))
            entry[1].append(layer)
            entry[2].append(rows)
            layer._version += 1
    for pool, held_layers, rows in held.values():
        pool.zero(pool.rows(held_layers, rows))
