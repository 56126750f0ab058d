"""Kind ``gainlora``: LoRA branches mixed per request by a gate (GainLoRA), written by ``clora train``.

Files (docs/adapter_formats.md): ``clora_adapter.json`` ({"kind": "gainlora", "branches", "ranks", "scale",
"target_modules", "modules", "gate": {"input_dim", "hidden_dim", "output_dim"}, ...}) and ``adapter.safetensors``
with ``lora.<module>.A.<i>`` (r_i, in), ``lora.<module>.B.<i>`` (out, r_i), ``gate.W1`` (hidden, H),
``gate.W2`` (out_dim, hidden), ``gate.keys`` (n, out_dim).

Gate, for the mean prompt embedding p (H,) (plain mean of ``embed_tokens`` over the prompt's token ids)::

    h = SiLU(W2 · SiLU(W1 · p));   g_i = |2 σ(4 · cos(h, k_i)) − 1|

computed in float32. Output of a module: W0 x + Σ_i g_i · s · B_i A_i x.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from ..errors import AdapterInvalid
from ..kinds import KIND_FILE, register_kind
from ..weights import AdapterWeights, LoraPair


def gate_values(W1: torch.Tensor, W2: torch.Tensor, keys: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """g (..., n) from pooled (..., H): W1 (D_h, H), W2 (D_g, D_h), keys (n, D_g); float32, differentiable."""
    p = pooled.float()
    h = F.silu(F.silu(p @ W1.float().t()) @ W2.float().t())  # (..., D_g)
    cos = F.normalize(h, dim=-1, eps=1e-8) @ F.normalize(keys.float(), dim=-1, eps=1e-8).t()  # (..., n)
    return (2 * torch.sigmoid(4 * cos) - 1).abs()


class GainGate:
    """The served gate: ``gate(pooled (H,) or (B, H)) -> (n,) or (B, n)`` branch weights in [0, 1)."""

    def __init__(self, W1: torch.Tensor, W2: torch.Tensor, keys: torch.Tensor) -> None:
        self.W1, self.W2, self.keys = W1.float(), W2.float(), keys.float()

    def __call__(self, pooled: torch.Tensor) -> torch.Tensor:
        dev = self.W1.device
        with torch.no_grad():
            return gate_values(self.W1, self.W2, self.keys, pooled.to(dev))

    def to(self, device: str | torch.device) -> "GainGate":
        return GainGate(self.W1.to(device), self.W2.to(device), self.keys.to(device))


@register_kind("gainlora")
def load_gainlora(path: Path, device: str = "cpu") -> AdapterWeights:
    path = Path(path)
    try:
        meta = json.loads((path / KIND_FILE).read_text())
        tensors = load_file(str(path / "adapter.safetensors"), device=device)
    except Exception as e:  # unreadable JSON or safetensors
        raise AdapterInvalid(f"gainlora adapter is unreadable: {e}", param="file") from e
    problems = [f"{k} missing from {KIND_FILE}" for k in ("branches", "ranks", "scale", "modules") if k not in meta]
    problems += [f"{k} missing from adapter.safetensors" for k in ("gate.W1", "gate.W2", "gate.keys")
                 if k not in tensors]
    if problems:
        raise AdapterInvalid("; ".join(problems), param="file")
    ranks = tuple(int(r) for r in meta["ranks"])
    n = int(meta["branches"])
    if len(ranks) != n or tensors["gate.keys"].shape[0] != n:
        raise AdapterInvalid(f"branches={n} but ranks={ranks} and {tensors['gate.keys'].shape[0]} gate keys",
                             param="file")
    scale = float(meta["scale"])
    modules: dict[str, LoraPair] = {}
    for mod in meta["modules"]:
        try:
            A = torch.cat([tensors[f"lora.{mod}.A.{i}"] for i in range(n)], 0)  # (R, in)
            B = torch.cat([tensors[f"lora.{mod}.B.{i}"] for i in range(n)], 1)  # (out, R)
        except KeyError as e:
            raise AdapterInvalid(f"{mod}: branch tensor {e} missing", param="file") from e
        if A.shape[0] != sum(ranks) or B.shape[1] != sum(ranks):
            raise AdapterInvalid(f"{mod}: A {tuple(A.shape)} / B {tuple(B.shape)} do not match ranks {ranks}",
                                 param="file")
        modules[mod] = LoraPair(A.contiguous(), B.contiguous(), scale)
    if not modules:
        raise AdapterInvalid("gainlora adapter holds no modules", param="file")
    gate = GainGate(tensors["gate.W1"], tensors["gate.W2"], tensors["gate.keys"])
    return AdapterWeights(kind="gainlora", rank=sum(ranks), modules=modules, segments=ranks, gate=gate,
                          meta={k: meta[k] for k in meta if k not in ("modules",)})
