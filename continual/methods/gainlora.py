"""``gainlora`` (GainLoRA, O-LoRA variant): a new LoRA branch per task, mixed by a per-input gate.

    y = W0 x + Σ_i g_i(x) · s · B_i A_i x,   g_i = |2σ(4 cos(h(p), k_i)) − 1|,   h = SiLU(W2 SiLU(W1 p))

``p`` is the mean of ``embed_tokens`` over the prompt's token ids (``tokenizer(prompt)["input_ids"]``; padding
masked, answer tokens excluded), in float32; the formula is shared with the served kind through
``adapters_store.loaders.gainlora.gate_values``. Per task t:

* old branches and keys are frozen; a new branch (PEFT init) and key k_t are added. O-LoRA's constraint holds
  exactly: the new A's rows start, and stay after every step, orthogonal to the old branches' rows (A_old A_newᵀ
  = 0). O-LoRA's soft penalty λ Σ|A_old A_newᵀ| is not used here: its L1 subgradient never vanishes; at λ 0.5
  it gave A_new a gradient of norm 28 at the start of task 1, against 0 from the task's loss (1.7 on B), so the
  gradient clip scaled the whole step down 28-fold and A's Adam steps followed the penalty, not the task;
* k_t starts orthogonal to the old tasks' gate outputs, so g_t ≈ 0 on old inputs: at the task's first training
  batch it is set to that batch's mean gate output projected off the old tasks' GPM basis U_h, normalised (the
  direction that opens g_t most on the new task among keys ⟂ U_h; a random key there barely opens: measured 0.2–0.4
  on its own task's prompts); random and projected when that projection vanishes;
* at task 0 only the key trains: with one branch the gate has nothing to tell apart, and training W1, W2 there
  collapsed h onto k_0 for every prompt (measured on standard_order1: g_0 0.96 on all four tasks, the task means of
  h at cosine 0.994, U_h one direction holding 88% of a new task's h), so later keys had almost nothing to aim at;
* from task 1, W1, W2 and k_t train, but their change since the task began is projected off the old tasks' GPM subspaces
  (inputs of W1: pooled prompts, U_p; inputs of W2: SiLU(W1 p), U_z; keys: gate outputs, U_h) after every step,
  so old inputs keep their gate outputs. Threshold schedule ``gate_threshold`` (GPM's 0.97) + 0.003 t;
* the gate may train at its own learning rate ``gate_lr`` (default: the LoRA's).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from adapters_store.loaders.gainlora import gate_values

from ..export import write_kind
from ..gpm import Projected, gpm_threshold, gpm_update_cov, keep_changes_off, project_off
from . import register_method
from .base import Method


class GateMLP(nn.Module):
    """W1 (D_h, H), W2 (D_g, D_h) without biases, and one key (D_g,) per branch."""

    def __init__(self, H: int, hidden: int, out: int, gen: torch.Generator) -> None:
        super().__init__()
        self.W1 = nn.Parameter(torch.empty(hidden, H).uniform_(-1 / math.sqrt(H), 1 / math.sqrt(H), generator=gen),
                               requires_grad=False)
        self.W2 = nn.Parameter(torch.empty(out, hidden).uniform_(-1 / math.sqrt(hidden), 1 / math.sqrt(hidden),
                                                                 generator=gen), requires_grad=False)
        self.keys = nn.ParameterList()

    def hidden(self, pooled: torch.Tensor) -> torch.Tensor:
        return nn.functional.silu(pooled.float() @ self.W1.t())  # (B, D_h)

    def output(self, pooled: torch.Tensor) -> torch.Tensor:
        return nn.functional.silu(self.hidden(pooled) @ self.W2.t())  # (B, D_g)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return gate_values(self.W1, self.W2, torch.stack(list(self.keys)), pooled)  # (B, n)


def pooled_prompt(embed: nn.Module, prompt_ids: list[list[int]], device: torch.device) -> torch.Tensor:
    """Mean token embedding per prompt, padding masked: (B, H) float32 (the engine's plain mean per prompt)."""
    L = max(len(ids) for ids in prompt_ids)
    ids = torch.zeros(len(prompt_ids), L, dtype=torch.long, device=device)
    mask = torch.zeros(len(prompt_ids), L, dtype=torch.float32, device=device)
    for i, row in enumerate(prompt_ids):
        ids[i, : len(row)] = torch.tensor(row, device=device)
        mask[i, : len(row)] = 1
    with torch.no_grad():
        e = embed(ids).float()  # (B, L, H)
    return (e * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # (B, H)


@register_method("gainlora")
class GainLoRA(Method):
    wants_memory = True
    memory_forward = False  # the memories are of the gate's inputs/outputs only: set_batch suffices

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        H = self.model.get_input_embeddings().embedding_dim
        self.gate = GateMLP(H, self.cfg.gate_hidden, self.cfg.gate_dim, self.gen).to(self.device)
        self.bases: dict[str, torch.Tensor] = {}  # "p", "z", "h" -> GPM bases
        self._start: dict[str, torch.Tensor] = {}
        self._recorded: dict[str, torch.Tensor] | None = None
        self._aim_key = False
        self._projected: list[Projected] = []  # what stays off what old tasks use (``_projections``)
        self.t = 0

    def begin_task(self, t: int) -> list[nn.Parameter]:
        self.t = t
        self.freeze_all()
        params: list[nn.Parameter] = []
        for layer in self.layers.values():
            i = layer.add_branch(self.cfg.rank, self.gen)
            params += [layer.As[i], layer.Bs[i]]
        for k in self.gate.keys:
            k.requires_grad_(False)
        key = torch.randn(self.cfg.gate_dim, generator=self.gen).to(self.device)
        key = project_off(key[None], self.bases.get("h"))[0]  # orthogonal to old gate outputs
        self.gate.keys.append(nn.Parameter(key / key.norm().clamp_min(1e-8)))
        self._aim_key = True  # at the first training batch (``set_batch``)
        self._start = {"W1": self.gate.W1.detach().clone(), "W2": self.gate.W2.detach().clone(),
                       "key": self.gate.keys[-1].detach().clone()}
        self._projected = self._projections(t)
        keep_changes_off(self._projected)  # the new A rows start off the old ones
        # At task 0 a single branch has nothing to tell apart, and training W1, W2 would collapse h onto k_0.
        mlp = [self.gate.W1, self.gate.W2] if t > 0 else []
        for p in mlp:
            p.requires_grad_(True)
        return params + mlp + [self.gate.keys[-1]]

    def _projections(self, t: int) -> list[Projected]:
        """Each new A itself off its module's old branch rows (an orthonormal basis of them), and the change of W1,
        W2 and the new key since the task began off the old tasks' U_p, U_z, U_h; nothing at task 0."""
        if t == 0:
            return []
        rows = [(layer.As[-1], None, torch.linalg.qr(torch.cat(list(layer.As)[:-1]).float().t())[0])
                for layer in self.layers.values()]
        gate = [(self.gate.W1, self._start["W1"], self.bases.get("p")),
                (self.gate.W2, self._start["W2"], self.bases.get("z")),
                (self.gate.keys[-1], self._start["key"], self.bases.get("h"))]
        return rows + [entry for entry in gate if entry[2] is not None]

    def param_groups(self, params: list[nn.Parameter]) -> list[dict]:
        return self.own_lr_groups(params, list(self.gate.parameters()), self.cfg.gate_lr or self.cfg.lr)

    def set_batch(self, prompt_ids: list[list[int]]) -> None:
        pooled = pooled_prompt(self.model.get_input_embeddings(), prompt_ids, self.device)  # (B, H)
        if self._aim_key:
            self._aim_key = False
            self._point_key(pooled)
        self.ctx.weights = self.gate(pooled)  # (B, n)
        if self._recorded is not None:
            with torch.no_grad():
                z = self.gate.hidden(pooled)
                h = self.gate.output(pooled)
            for name, x in (("p", pooled), ("z", z), ("h", h)):
                self._recorded[name] = self._recorded.get(name, 0) + x.t() @ x

    @torch.no_grad()
    def _point_key(self, pooled: torch.Tensor) -> None:
        """Turn the new key towards the new task's prompts, staying orthogonal to the old tasks' gate outputs."""
        aim = project_off(self.gate.output(pooled).mean(0, keepdim=True), self.bases.get("h"))[0]
        if aim.norm() > 1e-6:
            key = self.gate.keys[-1]
            key.copy_(aim / aim.norm())
            self._start["key"].copy_(key)  # in place: ``_projected`` holds it

    def after_step(self) -> None:
        """Keep the new A's rows off the old ones, and W1, W2 and the new key's change since the task began off
        the old tasks' subspaces."""
        keep_changes_off(self._projected)

    def end_task(self, t: int) -> None:
        self.freeze_all()
        for p in self.gate.parameters():
            p.requires_grad_(False)

    def start_recording(self) -> None:
        self._recorded = {}

    def finish_recording(self, t: int) -> None:
        rec, self._recorded = self._recorded or {}, None
        for name, cov in rec.items():
            threshold = gpm_threshold(t, base=self.cfg.gate_threshold)
            self.bases[name] = gpm_update_cov(self.bases.get(name), cov, threshold).to(self.device)

    def export(self, out_dir: Path, t: int) -> list[tuple[str, Path]]:
        n = len(self.gate.keys)
        tensors = {"gate.W1": self.gate.W1.detach(), "gate.W2": self.gate.W2.detach(),
                   "gate.keys": torch.stack([k.detach() for k in self.gate.keys])}
        for path, layer in self.layers.items():
            for i in range(n):
                tensors[f"lora.{path}.A.{i}"] = layer.As[i].detach()
                tensors[f"lora.{path}.B.{i}"] = layer.Bs[i].detach()
        any_layer = next(iter(self.layers.values()))
        meta = {
            "kind": "gainlora", "format_version": 1, "branches": n, "ranks": any_layer.ranks,
            "rank": self.cfg.rank, "alpha": self.cfg.alpha, "scale": self.cfg.scale,
            "target_modules": sorted(self.cfg.target_modules), "modules": sorted(self.layers),
            "gate": {"input_dim": int(self.gate.W1.shape[1]), "hidden_dim": int(self.gate.W1.shape[0]),
                     "output_dim": int(self.gate.W2.shape[0]), "activation": "silu",
                     "pooling": "mean of embed_tokens over tokenizer(prompt)['input_ids']",
                     "formula": "g_i = |2*sigmoid(4*cos(silu(W2 silu(W1 p)), k_i)) - 1|"},
            "base_model": self.base_name, "tasks": [task.name for task in self.tasks[: t + 1]],
        }
        path = Path(out_dir) / self.cfg.name
        write_kind(path, meta, tensors)
        return [(self.cfg.name, path)]

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors, meta = super().state()
        tensors["gate.W1"] = self.gate.W1.detach()
        tensors["gate.W2"] = self.gate.W2.detach()
        for i, k in enumerate(self.gate.keys):
            tensors[f"gate.key.{i}"] = k.detach()
        for name, U in self.bases.items():
            tensors[f"gpm.{name}"] = U
        meta["keys"] = len(self.gate.keys)
        return tensors, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        super().load_state(tensors, meta)
        with torch.no_grad():
            self.gate.W1.copy_(tensors["gate.W1"])
            self.gate.W2.copy_(tensors["gate.W2"])
        self.gate.keys = nn.ParameterList(
            [nn.Parameter(tensors[f"gate.key.{i}"].to(self.device), requires_grad=False) for i in range(meta["keys"])])
        self.bases = {k[4:]: v.to(self.device) for k, v in tensors.items() if k.startswith("gpm.")}
