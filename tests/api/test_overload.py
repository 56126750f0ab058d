"""A full queue answers 503 with Retry-After; everything admitted still completes."""

from __future__ import annotations

import concurrent.futures as cf
from pathlib import Path

import httpx

from tests.api.conftest import tiny_env
from tests.server_proc import ServerProcess


def test_queue_full_is_503_with_retry_after(tiny_llama_dir: Path, tiny_adapters: Path, tmp_path: Path) -> None:
    env = tiny_env(tiny_llama_dir, tiny_adapters, CLORA_MAX_BATCH_SIZE="1", CLORA_MAX_QUEUE="1")
    body = {"model": "alpha", "prompt": "Once upon a time", "max_tokens": 300, "ignore_eos": True,
            "temperature": 0}
    with ServerProcess(env, tmp_path / "log") as srv:
        with cf.ThreadPoolExecutor(8) as ex:
            rs = list(ex.map(lambda _: httpx.post(srv.url + "/v1/completions", json=body, timeout=120), range(8)))
    codes = sorted(r.status_code for r in rs)
    assert set(codes) <= {200, 503} and codes.count(503) >= 1 and codes.count(200) >= 1, codes
    for r in rs:
        if r.status_code == 503:
            assert r.headers["retry-after"].isdigit()
            assert r.json()["error"]["type"] == "overloaded_error"
        else:
            assert r.json()["usage"]["completion_tokens"] == 300


def _complete(srv: ServerProcess, job: tuple[str, str]) -> str:
    r = httpx.post(srv.url + "/v1/completions", timeout=120, json={
        "model": job[0], "prompt": job[1], "max_tokens": 20, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_more_adapters_than_slots_wait_their_turn(tiny_llama_dir: Path, tiny_adapters: Path, tmp_path: Path) -> None:
    """Adapters of rank 4, 8 and 16 in one compute slot of rank 16: every request completes, each equal to its
    output alone, none fails."""
    env = tiny_env(tiny_llama_dir, tiny_adapters, CLORA_MAX_LORAS="1", CLORA_MAX_CPU_LORAS="2")
    jobs = [(["alpha", "beta", "gamma"][i % 3], f"prompt number {i}") for i in range(12)]
    with ServerProcess(env, tmp_path / "log") as srv:
        alone = [_complete(srv, j) for j in jobs]
        with cf.ThreadPoolExecutor(12) as ex:
            together = list(ex.map(lambda j: _complete(srv, j), jobs))
        assert together == alone
        assert srv.metric("clora_adapter_evictions_total", {"tier": "slot"}) > 0


def test_adapters_of_smaller_rank_share_a_slot(tiny_llama_dir: Path, tiny_adapters: Path, tmp_path: Path) -> None:
    """One compute slot of rank 16 holds the rank-4 and the rank-8 adapter at once: requests on both, one by one
    and concurrently, never evict either."""
    env = tiny_env(tiny_llama_dir, tiny_adapters, CLORA_MAX_LORAS="1")
    jobs = [(["alpha", "beta"][i % 2], f"prompt number {i}") for i in range(8)]
    with ServerProcess(env, tmp_path / "log") as srv:
        alone = [_complete(srv, j) for j in jobs]
        with cf.ThreadPoolExecutor(8) as ex:
            together = list(ex.map(lambda j: _complete(srv, j), jobs))
        assert together == alone
        assert srv.metric("clora_adapter_evictions_total", {"tier": "slot"}, default=0.0) == 0
        assert srv.metric("clora_adapters_resident", {"tier": "slot"}) == 2
        assert srv.metric("clora_slot_rank_rows", {"state": "used"}) == 4 + 8
        assert srv.metric("clora_slot_rank_rows", {"state": "free"}) == 16 - 12
