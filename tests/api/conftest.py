"""A real server on the tiny random Llama with three PEFT adapters (float32, so exactness holds)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.engine.peft_helpers import make_peft_adapter
from tests.server_proc import TEST_DEVICE, ServerProcess


@pytest.fixture(scope="session")
def tiny_adapters(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny-adapters")
    make_peft_adapter(tiny_llama_dir, root / "alpha", r=4, seed=11, std=0.3)
    make_peft_adapter(tiny_llama_dir, root / "beta", r=8, seed=12, targets=("q_proj", "v_proj", "down_proj"), std=0.3)
    make_peft_adapter(tiny_llama_dir, root / "gamma", r=16, seed=13, std=0.3)
    return root


def tiny_env(tiny_llama_dir: Path, adapters: Path, **extra: str) -> dict[str, str]:
    env = {"CLORA_BASE_MODEL": str(tiny_llama_dir), "CLORA_ADAPTERS_DIR": str(adapters),
           "CLORA_DTYPE": "float32", "CLORA_DEVICE": TEST_DEVICE, "CLORA_ROUTER": "hint", "CLORA_MAX_BATCH_SIZE": "8",
           "CLORA_MAX_LORAS": "4", "CLORA_MAX_LORA_RANK": "16"}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path, tiny_adapters: Path, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("logs") / "server.log"
    with ServerProcess(tiny_env(tiny_llama_dir, tiny_adapters), log) as srv:
        yield srv
