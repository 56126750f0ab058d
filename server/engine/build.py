"""Assemble an engine from a loaded base model: wrap the LoRA layers, size the cache, start nothing."""

from __future__ import annotations

import logging
from typing import Callable

import torch

from adapters_store.weights import AdapterWeights
from base_model.loader import LoadedModel

from ..settings import EngineConfig
from .engine import Engine, EngineHooks
from .lora_kernel import load_kernel
from .lora_layers import lora_dtype, wrap_lora_layers
from .packed_lora import pack_for_cpu
from .slots import AdapterKey

log = logging.getLogger(__name__)


def context_length(loaded: LoadedModel, max_model_len: int | None) -> int:
    native = int(getattr(loaded.model.config, "max_position_embeddings", 2048) or 2048)
    return min(native, max_model_len) if max_model_len else native


def build_engine(
    loaded: LoadedModel,
    cfg: EngineConfig,
    weights_for: Callable[[AdapterKey], AdapterWeights],
    max_model_len: int | None,
    hooks: EngineHooks | None = None,
) -> Engine:
    pool_rows = cfg.max_loras * cfg.max_lora_rank  # the slots' rank rows: smaller ranks share them (slots.py)
    batch, layers = wrap_lora_layers(loaded.model, cfg.target_modules, pool_rows,
                                     lora_dtype(loaded.device, loaded.dtype))
    if cfg.pack_weights:
        bf16_cpu = loaded.device.type == "cpu" and loaded.dtype == torch.bfloat16  # the only case packing takes
        kernel = load_kernel(cfg.kernel_dir) if cfg.kernel_dir is not None and bf16_cpu and layers else None
        packed, fused, mlps = pack_for_cpu(loaded.model, layers, kernel)  # the base linears inside the LoRA wrappers too
        log.info("packed %d base linear layers for oneDNN; %d attentions with fused q/k/v, %d fused MLPs",
                 packed, fused, mlps)
    return Engine(
        loaded.model, loaded.tokenizer, batch, layers, weights_for,
        max_batch_size=cfg.max_batch_size, pool_rows=pool_rows, max_queue=cfg.max_queue,
        max_model_len=context_length(loaded, max_model_len), prefill_chunk=cfg.prefill_chunk, hooks=hooks,
    )
