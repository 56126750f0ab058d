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


def _generate_all(engine, prompts: list[list[int]], max_tokens: list[int], timeout: float = 60.0) -> list[list]:  # type: ignore[no-untyped-def]
    from server.engine.requests import GenerationRequest
    from server.engine.sampling import SamplingParams

    events: list[list] = [[] for _ in prompts]
    done = [threading.Event() for _ in prompts]

    def emitter(i: int):  # type: ignore[no-untyped-def]
        def emit(ev) -> None:  # type: ignore[no-untyped-def]
            events[i].append(ev)
            if type(ev).__name__ in ("Done", "Failed"):
                done[i].set()
        return emit

    for i, (p, n) in enumerate(zip(prompts, max_tokens)):
        engine.submit(GenerationRequest(prompt_ids=p, params=SamplingParams(max_tokens=n, temperature=0.0,
                                                                             ignore_eos=True), emit=emitter(i)))
    for d in done:
        assert d.wait(timeout), "a request was never answered: the engine loop died"
    return events


def test_long_prompts_grow_the_cache_and_rows_retire_out_of_order(tiny_llama_dir: Path) -> None:
    """Prompts longer than the initial cache make it grow inside a step; rows that finish first are then compacted
    away (an in-place copy on the grown cache) while the others go on. Found by bench/router_e2e.py: the copy ran
    outside inference mode and killed the engine thread."""
    loaded = load_base_model(str(tiny_llama_dir), tiny_llama_dir, "cpu", "float32")
    engine = build_engine(loaded, Settings(max_loras=2).engine, weights_for=lambda key: None,  # type: ignore[arg-type,return-value]
                          max_model_len=512)
    engine.start()
    try:
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(5, 1000, (n,), generator=g).tolist() for n in (300, 280, 310)]
        events = _generate_all(engine, prompts, [2, 6, 4])
        for evs, n in zip(events, [2, 6, 4]):
            assert type(evs[-1]).__name__ == "Done", evs[-1]
            assert evs[-1].completion_tokens == n
        again = _generate_all(engine, prompts[1:2], [6])  # the loop is alive and gives the same answer alone
        assert [e.token_id for e in again[0] if hasattr(e, "token_id")] == \
            [e.token_id for e in events[1] if hasattr(e, "token_id")]
    finally:
        engine.stop()
