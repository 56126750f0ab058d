"""Exported PEFT adapters (seq, olora, clora) load in peft and give the training-time model's logits."""

import copy

import pytest
import torch

from adapters_store.kinds import load_adapter_dir
from continual.batching import prompt_ids

from .helpers import logits, randomize, tiny, tiny_method


@pytest.mark.parametrize("method,tasks", [("seq", 1), ("olora", 2), ("clora", 2)])
def test_peft_export_matches_training_model(tmp_path, tiny_llama_dir, cl_data_dir, method, tasks):
    from peft import PeftModel

    loaded, m = tiny_method(tiny_llama_dir, cl_data_dir, method)
    for t in range(tasks):
        m.begin_task(t)
        randomize(m, t, gen_seed=t + 1)
        m.end_task(t) if method != "clora" or t < tasks - 1 else None  # leave clora's last R_δ unfolded
    prompt = m.tasks[0].test[0].prompt
    m.set_batch(prompt_ids(loaded.tokenizer, [prompt]))
    want = logits(loaded.model, loaded.tokenizer, prompt)
    [(name, path)] = m.export(tmp_path / "adapters", tasks - 1)
    assert (path / "adapter_config.json").is_file() and (path / "adapter_model.safetensors").is_file()

    base = tiny(tiny_llama_dir).model
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(path))
    got = logits(peft_model, loaded.tokenizer, prompt)
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    assert not torch.allclose(logits(base, loaded.tokenizer, prompt), want, atol=1e-3)  # the adapter matters

    w = load_adapter_dir(path)
    assert w.kind == "peft_lora" and w.rank == 8 * (tasks if method == "olora" else 1)
    layer = next(iter(m.layers.items()))
    pair = w.modules[layer[0]]
    assert torch.allclose(pair.scale * pair.B @ pair.A, layer[1].delta_weight().detach(), atol=1e-6)
