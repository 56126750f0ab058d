"""The real app (tiny random Llama) exports every metric the dashboard uses, and counts cache hits after traffic."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.main import create_app
from server.settings import Settings

from .services import wait_for
from .test_metrics import dashboard_exprs
from .test_prometheus_scrape import ThreadedServer

pytestmark = pytest.mark.slow


def families(payload: str) -> dict[str, set[str]]:
    """Family name -> sample names with at least one series (families without series map to an empty set)."""
    out: dict[str, set[str]] = {}
    for line in payload.splitlines():
        m = re.match(r"# TYPE (\S+) (\S+)", line)
        if m:
            out.setdefault(m.group(1), set())
    for fam in text_string_to_metric_families(payload):
        out.setdefault(fam.name, set()).update(s.name for s in fam.samples)
    return out


def test_real_app_exports_dashboard_metrics_after_traffic(tiny_llama_dir: Path, tmp_path: Path) -> None:
    settings = Settings(base_model=str(tiny_llama_dir), adapters_dir=tmp_path / "adapters",
                        model_cache_dir=tmp_path / "cache", device="cpu", dtype="float32", max_batch_size=4,
                        max_loras=2, max_cpu_loras=2)
    with ThreadedServer(create_app(settings), lifespan="on") as srv, httpx.Client(
        base_url=f"http://127.0.0.1:{srv.port}", timeout=60
    ) as client:
        wait_for(lambda: client.get("/ready").status_code == 200, 120, "the app to become ready", interval_s=0.2)
        body = {"prompt": "Hello there", "max_tokens": 4, "temperature": 0}
        first = client.post("/v1/generate", json=body)
        second = client.post("/v1/generate", json=body)
        assert first.status_code == second.status_code == 200
        assert (first.headers["x-cache"], second.headers["x-cache"]) == ("miss", "hit")
        assert second.json()["cached"] is True and second.json()["text"] == first.json()["text"]
        sampled = client.post("/v1/generate", json={**body, "temperature": 0.8})
        assert sampled.status_code == 200 and sampled.headers["x-cache"] == "bypass"

        scrape = client.get("/metrics")
        assert scrape.status_code == 200 and scrape.headers["content-type"].startswith("text/plain")
        fams = families(scrape.text)

    exported_families = set(fams)
    referenced = {m for e in dashboard_exprs() for m in re.findall(r"\bclora_[a-z0-9_]+", e)}
    missing = {
        name for name in referenced
        if not any(name == f or name.startswith(f + "_") or name == f + "_total" for f in exported_families)
    }
    assert not missing, f"the app does not export: {sorted(missing)}"
    samples = set().union(*fams.values())
    for name in ["clora_requests_total", "clora_request_latency_seconds_bucket", "clora_generated_tokens_total",
                 "clora_cache_hits_total", "clora_cache_misses_total", "clora_batch_size",
                 "clora_decode_step_rows_count"]:
        assert name in samples, f"{name} has no series after traffic"
    text = scrape.text
    assert re.search(r'clora_cache_hits_total 1\.0', text)
    assert re.search(r'clora_requests_total\{[^}]*adapter="__base__"[^}]*status="200"[^}]*\} 3\.0', text)
