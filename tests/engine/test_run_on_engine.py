"""Model work from other threads (router encoders) runs on the engine thread, between steps, bare base model."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from base_model.loader import load_base_model
from server.engine.build import build_engine
from server.settings import Settings


@pytest.fixture()
def engine(tiny_llama_dir: Path):  # type: ignore[no-untyped-def]
    loaded = load_base_model(str(tiny_llama_dir), tiny_llama_dir, "cpu", "float32")
    eng = build_engine(loaded, Settings(max_loras=2).engine, weights_for=lambda key: None, max_model_len=64)  # type: ignore[arg-type,return-value]
    yield eng
    eng.stop()


def test_before_start_it_runs_in_place(engine) -> None:  # type: ignore[no-untyped-def]
    assert engine.run_on_engine(threading.current_thread) is threading.current_thread()


def test_runs_on_the_engine_thread_with_no_adapter_and_returns_or_raises(engine) -> None:  # type: ignore[no-untyped-def]
    engine.start()
    engine.lora_batch.uniq_list = [0]  # as if a step had left its adapters applied

    def job() -> tuple[threading.Thread, bool]:
        with torch.inference_mode():
            engine.runner.model(torch.tensor([[1, 2, 3]]))  # the model is usable from here
        return threading.current_thread(), engine.lora_batch.active

    thread, lora_active = engine.run_on_engine(job)
    assert thread.name == "clora-engine" and thread is not threading.current_thread()
    assert lora_active is False

    def boom() -> None:
        raise ValueError("from the engine thread")

    with pytest.raises(ValueError, match="from the engine thread"):
        engine.run_on_engine(boom)
    assert engine.run_on_engine(lambda: 41 + 1) == 42  # the loop survived the error
