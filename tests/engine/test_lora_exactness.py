"""Every row of a mixed-adapter batch equals PEFT's PeftModel with that adapter alone (float32)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapters_store.kinds import load_adapter_dir
from server.engine.lora_layers import build_lora_batch, wrap_lora_layers
from server.engine.model_runner import ModelRunner
from server.settings import DEFAULT_TARGET_MODULES

from .peft_helpers import fixed_rows, make_peft_adapter


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "r4": make_peft_adapter(tiny_llama_dir, root / "r4", r=4, seed=1),
        "r8mlp": make_peft_adapter(tiny_llama_dir, root / "r8mlp", r=8, seed=2,
                                   targets=("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj")),
        "r16": make_peft_adapter(tiny_llama_dir, root / "r16", r=16, seed=3, targets=tuple(DEFAULT_TARGET_MODULES)),
    }


def _peft_logits(base_dir: Path, adapter_dir: Path | None, seq: list[int]) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir).eval()
    with torch.no_grad():
        return model(torch.tensor([seq])).logits[0]  # (T, V)


@pytest.mark.parametrize("per_row", [False, True], ids=["masked", "per-row"])
def test_mixed_batch_rows_equal_peft_alone(tiny_llama_dir: Path, adapters: dict[str, Path], per_row: bool) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    batch, layers = wrap_lora_layers(model, DEFAULT_TARGET_MODULES, pool_rows=4 * 16)
    ranks = {}
    for slot, name in enumerate(["r4", "r8mlp", "r16"]):
        w = load_adapter_dir(adapters[name])
        for path, pair in w.modules.items():
            layers[path].set_slot(slot, fixed_rows({slot: pair.A.shape[0]}, 16)[slot], pair.A, pair.B, pair.scale)
        ranks[slot] = w.rank
    runner = ModelRunner(model, max_rows=4, max_len=128)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (7, 12, 5, 9)]
    row_slots = [0, -1, 2, 1]  # r4, base, r16, r8mlp
    names = ["r4", None, "r16", "r8mlp"]

    build_lora_batch(batch, row_slots, [None] * 4, fixed_rows(ranks, 16), runner.device, runner.dtype, per_row=per_row)
    assert batch.per_row == per_row
    logits = runner.prefill([0, 1, 2, 3], prompts)
    seqs = [list(p) for p in prompts]
    lens = [len(p) for p in prompts]
    steps = [logits]
    for _ in range(3):  # greedy decode together
        nxt = [int(l.argmax()) for l in steps[-1]]
        for s, t in zip(seqs, nxt):
            s.append(t)
        steps.append(runner.decode(nxt, lens))
        lens = [n + 1 for n in lens]
    for i, name in enumerate(names):
        ref = _peft_logits(tiny_llama_dir, adapters[name] if name else None, seqs[i])
        n0 = len(prompts[i])
        for k, step in enumerate(steps):
            diff = (step[i] - ref[n0 - 1 + k]).abs().max().item()
            assert diff < 1e-4, f"row {i} ({name}) step {k}: max |Δlogit| = {diff}"
        # the adapter changes the output: this is not the base model in disguise
        if name:
            base = _peft_logits(tiny_llama_dir, None, seqs[i])
            assert (base[n0 - 1] - ref[n0 - 1]).abs().max().item() > 1e-3


def _r8mlp_in_slot_0(tiny_llama_dir: Path, adapters: dict[str, Path]):  # type: ignore[no-untyped-def]
    """The tiny model with adapter r8mlp in slot 0: its LoRA batch and a 3-row runner."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    batch, layers = wrap_lora_layers(model, DEFAULT_TARGET_MODULES, pool_rows=2 * 16)
    w = load_adapter_dir(adapters["r8mlp"])
    for path, pair in w.modules.items():
        layers[path].set_slot(0, list(range(pair.A.shape[0])), pair.A, pair.B, pair.scale)
    return batch, ModelRunner(model, max_rows=3, max_len=64)


def test_gate_weights_scale_rank_segments(tiny_llama_dir: Path, adapters: dict[str, Path]) -> None:
    """A per-rank weight of 0 on every rank gives exactly the base model; 1 gives the adapter."""
    batch, runner = _r8mlp_in_slot_0(tiny_llama_dir, adapters)
    prompt = list(range(10, 20))
    build_lora_batch(batch, [0, 0, -1], [torch.zeros(8), torch.ones(8), None], {0: range(8)}, runner.device, runner.dtype)
    out = runner.prefill([0, 1, 2], [prompt] * 3)
    assert torch.equal(out[0], out[2])
    assert (out[1] - out[2]).abs().max() > 1e-3


def test_batch_layout_gives_each_slot_its_own_rank_and_each_row_its_slot() -> None:
    from server.engine.lora_layers import LoraBatch

    b = LoraBatch()
    rows = {3: range(40, 44), 5: range(8)}
    build_lora_batch(b, [3, 5, -1, 3, 5, 5], [None] * 6, rows, torch.device("cpu"), torch.float32, True)
    assert b.spans == [(0, 4), (4, 8)]  # each slot takes its own rank's columns, none padded to the largest
    assert b.mask.shape == (6, 1, 12) and b.mask[0, 0].tolist() == [1.0] * 4 + [0.0] * 8
    assert b.mask[2].sum() == 0 and b.mask[1, 0].tolist() == [0.0] * 4 + [1.0] * 8
    assert b.row_pos == [0, 1, -1, 0, 1, 1] and b.row_index(torch.device("cpu")).tolist() == [0, 1, 0, 0, 1, 1]
    w = b.row_weights(2, torch.float32)  # two layers' blocks of max rank 8: the slot's rank, then zeros
    assert w.shape == (6, 1, 16) and w[0, 0].tolist() == ([1.0] * 4 + [0.0] * 4) * 2
    assert w[1, 0].tolist() == [1.0] * 16 and w[2].sum() == 0
    pool = torch.arange(50.0).view(50, 1)  # row i holds i; the last row is the padding row
    assert b.rank_rows(pool).flatten().tolist() == [40, 41, 42, 43, *range(8)]  # each slot's rows, in slot order
    assert b.stacked_rows(pool).squeeze(-1).tolist() == [[40, 41, 42, 43, 49, 49, 49, 49], list(range(8))]


def test_per_row_gates_weigh_each_row(tiny_llama_dir: Path, adapters: dict[str, Path]) -> None:
    """Per-row rank weights (GainLoRA gates) act on the per-row path exactly as under the mask."""
    batch, runner = _r8mlp_in_slot_0(tiny_llama_dir, adapters)
    prompt = list(range(10, 20))
    weights = [torch.linspace(0, 1, 8), torch.ones(8), None]
    outs = []
    for per_row in (False, True):
        build_lora_batch(batch, [0, 0, -1], weights, {0: range(8)}, runner.device, runner.dtype, per_row=per_row)
        outs.append(runner.prefill([0, 1, 2], [prompt] * 3))
    assert (outs[0] - outs[1]).abs().max().item() < 1e-5
    assert (outs[1][0] - outs[1][1]).abs().max() > 1e-3  # the two gate vectors really differ in effect
