"""What the engine sends back per request: text deltas then Done, or Done alone with the whole text."""

from __future__ import annotations

import queue
from pathlib import Path

import pytest

from base_model.loader import load_base_model
from server.engine.build import build_engine
from server.engine.requests import Delta, Done, GenerationRequest
from server.engine.sampling import SamplingParams
from server.settings import Settings


@pytest.fixture()
def engine(tiny_llama_dir: Path):  # type: ignore[no-untyped-def]
    loaded = load_base_model(str(tiny_llama_dir), tiny_llama_dir, "cpu", "float32")
    eng = build_engine(loaded, Settings(max_loras=2).engine, weights_for=lambda key: None, max_model_len=64)  # type: ignore[arg-type,return-value]
    eng.start()
    yield eng
    eng.stop()


def events(engine, params: SamplingParams, deltas: bool) -> list:  # type: ignore[no-untyped-def]
    got: queue.SimpleQueue = queue.SimpleQueue()
    engine.submit(GenerationRequest(prompt_ids=[5, 9, 13, 2], params=params, emit=got.put, deltas=deltas))
    out = [got.get(timeout=60)]
    while not isinstance(out[-1], Done):
        out.append(got.get(timeout=60))
    return out


@pytest.mark.parametrize("stop", [(), ("e",)])
def test_a_request_without_deltas_gets_done_alone_with_the_streamed_text(engine, stop: tuple[str, ...]) -> None:  # type: ignore[no-untyped-def]
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=7, ignore_eos=True, stop=stop)  # seeded: same tokens
    streamed = events(engine, params, deltas=True)
    whole = events(engine, params, deltas=False)
    text = "".join(e.text for e in streamed if isinstance(e, Delta))
    assert text and streamed[-1].text == text
    assert len(whole) == 1 and whole[0].text == text
    assert (whole[0].finish_reason, whole[0].completion_tokens) == (streamed[-1].finish_reason,
                                                                     streamed[-1].completion_tokens)

