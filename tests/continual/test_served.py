"""Train GainLoRA with ``clora train --register`` into a running server; served predictions match the trainer's.

The prompts of predictions.jsonl go over HTTP with no task hint (`model: "auto"`, `CLORA_ROUTER=gates`): the
engine computes each request's gates from its prompt and mixes the branches in the batched LoRA path.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
from pathlib import Path

import httpx
import pytest

from server.cli import main
from tests.server_proc import ServerProcess

pytestmark = pytest.mark.slow
TOKEN = "served-admin-token"


def test_served_gainlora_reproduces_trainer_predictions(tmp_path: Path, tiny_llama_dir: Path,
                                                        cl_data_dir: Path) -> None:
    env = {"CLORA_BASE_MODEL": str(tiny_llama_dir), "CLORA_ADAPTERS_DIR": str(tmp_path / "store"),
           "CLORA_DTYPE": "float32", "CLORA_DEVICE": "cpu", "CLORA_ROUTER": "gates", "CLORA_ADMIN_TOKEN": TOKEN,
           "CLORA_ROUTER_MIN_CONFIDENCE": "0.0", "CLORA_MAX_BATCH_SIZE": "8"}
    out = tmp_path / "run"
    with ServerProcess(env, tmp_path / "server.log") as srv:
        rc = main(["train", "--data", str(cl_data_dir), "--tasks", "agnews,amazon", "--method", "gainlora",
                   "--max-train", "8", "--max-test", "10", "--max-input-chars", "120", "--batch-size", "4",
                   "--eval-batch-size", "4", "--max-new-tokens", "4", "--lr", "5e-2", "--out", str(out),
                   "--base-model", str(tiny_llama_dir), "--device", "cpu", "--dtype", "float32",
                   "--no-progress", "--num-threads", "1", "--register", srv.url, "--admin-token", TOKEN])
        assert rc == 0
        m = httpx.get(srv.url + "/admin/adapters/gainlora", headers={"Authorization": f"Bearer {TOKEN}"}).json()
        assert m["kind"] == "gainlora" and m["versions"] == [1, 2]  # one version per task learned
        preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
        assert len(preds) == 20

        def serve(p: dict) -> dict:
            r = httpx.post(srv.url + "/v1/completions", timeout=120, json={
                "model": "auto", "prompt": p["prompt"], "max_tokens": 4, "temperature": 0, "stop": ["\n"]})
            assert r.status_code == 200, r.text
            return r.json()

        with cf.ThreadPoolExecutor(8) as ex:  # served in mixed batches
            served = list(ex.map(serve, preds))
    assert all(s["route"]["method"] == "gates" and s["route"]["adapter"] == "gainlora" for s in served)
    assert all(s["route"]["version"] == 2 for s in served)
    agree = sum(s["choices"][0]["text"] == p["prediction"] for s, p in zip(served, preds)) / len(preds)
    assert agree >= 0.99, [(s["choices"][0]["text"], p["prediction"]) for s, p in zip(served, preds)]
