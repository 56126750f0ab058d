"""The default router on the real CL benchmark: the 4 standard tasks from raw inputs (slow: tfidf + SmolLM2 states)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from router.calibration import expected_calibration_error
from router.registry import DEFAULT_KIND, make_router

STANDARD = ["dbpedia", "amazon", "yahoo", "agnews"]


def inputs(path: Path, n: int) -> list[str]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line)["input"] for _, line in zip(range(n), f)]


@pytest.fixture(scope="module")
def deps(smollm2_dir: Path) -> dict:
    """What the default kind needs from the server: an embedder over the resident base model's states."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from router.base_hidden import hidden_state_embedder

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return {"embed": hidden_state_embedder(model, AutoTokenizer.from_pretrained(smollm2_dir))}


@pytest.mark.slow
def test_default_router_identifies_the_standard_tasks(cl_data_dir: Path, tmp_path: Path, deps: dict) -> None:
    router = make_router(DEFAULT_KIND, **deps)
    router.fit({t: inputs(cl_data_dir / t / "train.jsonl", 200) for t in STANDARD})
    test = {t: inputs(cl_data_dir / t / "test.jsonl", 100) for t in STANDARD}
    texts = [x for t in STANDARD for x in test[t]]
    gold = np.array([t for t in STANDARD for _ in test[t]])
    decisions = router.route(texts)
    pred = np.array([d.adapter for d in decisions])
    conf = np.array([d.confidence for d in decisions])
    acc = (pred == gold).mean()
    assert acc >= 0.97, {t: float((pred[gold == t] == t).mean()) for t in STANDARD}
    assert expected_calibration_error(conf, pred == gold) < 0.05
    router.save(tmp_path)
    again = make_router(DEFAULT_KIND, **deps)
    again.load(tmp_path)
    assert [d.adapter for d in again.route(texts)] == list(pred)
