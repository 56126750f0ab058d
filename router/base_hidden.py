"""The ``base-hidden`` router: mean-pooled hidden states of the resident base model (no second model).

The router takes an injected ``embed(texts) -> (N, H)``; ``hidden_state_embedder`` builds one from a Hugging Face
causal LM + tokenizer: the masked mean of the hidden state after ``layer`` decoder layers, over the first
``max_tokens`` tokens. Stopping at an early layer runs only those layers (a view that shares the model's
parameters and leaves the model itself untouched), which is what keeps routing cheap next to generation.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from .dense import DenseRouter, Embed, Run, run_here

DEFAULT_LAYER = 6  # bench/router_sweep.py on the dev splits: 6 ties 8 (99.87%, cascade too) for 25% less compute
DEFAULT_MAX_TOKENS = 64


def _decoder_stack(model: Any) -> Any:
    """The decoder (``model.model`` for *ForCausalLM), with its ``layers`` ModuleList."""
    inner = getattr(model, "model", model)
    if not hasattr(inner, "layers"):
        raise ValueError(f"{type(model).__name__} has no decoder layer list (.model.layers)")
    return inner


def truncated_decoder(model: Any, n_layers: int) -> Any:
    """A shallow view of the decoder running only its first ``n_layers`` layers; parameters are shared, and
    the original module tree is not modified."""
    import torch

    inner = _decoder_stack(model)
    total = len(inner.layers)
    if not 1 <= n_layers <= total:
        raise ValueError(f"layer must be in 1..{total}, got {n_layers}")
    if n_layers == total:
        return inner
    view = copy.copy(inner)
    view._modules = dict(inner._modules)  # own child table: setting layers below must not touch `inner`
    view.layers = torch.nn.ModuleList(list(inner.layers)[:n_layers])
    view.config = copy.copy(inner.config)
    view.config.num_hidden_layers = n_layers
    if getattr(view.config, "layer_types", None) is not None:
        view.config.layer_types = list(view.config.layer_types)[:n_layers]
    return view


def hidden_state_embedder(model: Any, tokenizer: Any, *, run: Run | None = None,
                          layer: int | None = DEFAULT_LAYER, max_tokens: int = DEFAULT_MAX_TOKENS,
                          batch_size: int = 16) -> Embed:
    """``embed(texts) -> (N, H)`` float32: masked mean over tokens of the hidden state after ``layer`` layers
    (``None`` = all layers, final norm applied). ``run(fn)`` executes each batch's forward (the server passes
    its engine's ``run_on_engine``, so the model only ever runs on the engine thread); default: in place."""
    import torch

    n_total = len(_decoder_stack(model).layers)
    decoder = truncated_decoder(model, n_total if layer is None else min(layer, n_total))
    run = run or run_here
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def embed(texts: list[str]) -> np.ndarray:
        out = []
        for i in range(0, len(texts), batch_size):
            ids = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_tokens] or [pad_id]
                   for t in texts[i:i + batch_size]]
            width = max(len(x) for x in ids)
            input_ids = torch.tensor([x + [pad_id] * (width - len(x)) for x in ids])  # (B, T) right-padded
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])  # (B, T)
            out.append(run(lambda: _pool(decoder, input_ids, mask)))
        return np.concatenate(out, axis=0) if out else np.zeros((0, decoder.config.hidden_size), np.float32)

    return embed


def _pool(decoder: Any, input_ids: Any, mask: Any) -> np.ndarray:
    import torch

    device = next(decoder.parameters()).device
    with torch.inference_mode():
        padded = not bool(mask.all())  # no padding (one text, or equal lengths): plain causal attention
        h = decoder(input_ids=input_ids.to(device), attention_mask=mask.to(device) if padded else None,
                    use_cache=False).last_hidden_state  # (B, T, H)
        m = mask.to(h.device, h.dtype).unsqueeze(-1)  # (B, T, 1)
        pooled = (h * m).sum(1) / m.sum(1)  # (B, H)
        return pooled.float().cpu().numpy()


class BaseHiddenRouter(DenseRouter):
    """Dense router on the base model's pooled hidden states; ``embed`` is required (the server builds it)."""

    kind = "base-hidden"

    def __init__(self, embed: Embed, C: float = 10.0, calibrate_folds: int = 3, layout_weight: float = 0.7) -> None:
        super().__init__(embed, C, calibrate_folds, layout_weight)
