"""The base-hidden embedder on a tiny random Llama: truncation is a view, pooling ignores padding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from router.base_hidden import hidden_state_embedder, truncated_decoder


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_llama_dir)


def test_truncated_view_shares_weights_and_leaves_model_whole(tiny) -> None:  # type: ignore[no-untyped-def]
    model, _ = tiny
    view = truncated_decoder(model, 1)
    assert len(view.layers) == 1 and len(model.model.layers) == 2
    assert model.config.num_hidden_layers == 2
    assert view.layers[0] is model.model.layers[0]
    with pytest.raises(ValueError, match="1..2"):
        truncated_decoder(model, 3)


def test_layer_output_is_the_normed_hidden_state_of_the_full_model(tiny) -> None:  # type: ignore[no-untyped-def]
    model, tok = tiny
    text = "Title: a test\nText: of pooled states"
    got = hidden_state_embedder(model, tok, layer=1)([text])  # (1, H)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.inference_mode():
        hs = model.model(input_ids=ids, output_hidden_states=True).hidden_states
        want = model.model.norm(hs[1]).mean(1).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_batched_equals_one_by_one_despite_padding(tiny) -> None:  # type: ignore[no-untyped-def]
    model, tok = tiny
    embed = hidden_state_embedder(model, tok, layer=None, max_tokens=16)
    texts = ["short", "a considerably longer text that fills the window with many tokens indeed", ""]
    batch = embed(texts)
    assert batch.shape == (3, model.config.hidden_size)
    for i, t in enumerate(texts):
        np.testing.assert_allclose(batch[i], embed([t])[0], rtol=1e-4, atol=1e-5)
