"""A real Prometheus scrapes ``Metrics.render()`` served over HTTP, and answers the dashboard's queries."""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.responses import Response

from server.metrics import Metrics

from .services import free_port, wait_for
from .test_metrics import dashboard_exprs, exercise

pytestmark = pytest.mark.prometheus


class ThreadedServer:
    """uvicorn serving ``app`` on 127.0.0.1 in a daemon thread."""

    def __init__(self, app: FastAPI, lifespan: str = "off") -> None:
        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False,
                           lifespan=lifespan)
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "ThreadedServer":
        self.thread.start()
        wait_for(lambda: self.server.started, 10, "uvicorn to start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def metrics_app(metrics: Metrics) -> FastAPI:
    app = FastAPI()

    @app.get("/metrics")
    def scrape() -> Response:
        payload, content_type = metrics.render()
        return Response(payload, media_type=content_type)

    return app


@pytest.fixture
def traffic() -> Iterator[Metrics]:
    """Metrics with a steady stream of 300 ms requests on two adapters, recorded from a background thread."""
    metrics = Metrics(["adapter-a", "adapter-b"])
    stop = threading.Event()

    def produce() -> None:
        while not stop.is_set():
            exercise(metrics)
            metrics.request_done("/v1/chat/completions", "adapter-b", "explicit", 200, 0.3)
            stop.wait(0.05)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        yield metrics
    finally:
        stop.set()
        thread.join(timeout=5)


def query(client: httpx.Client, base: str, expr: str) -> dict:
    r = client.get(f"{base}/api/v1/query", params={"query": expr}, timeout=5)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
    return body["data"]


def test_prometheus_scrapes_metrics_and_computes_quantiles(
    prometheus_binary: str, traffic: Metrics, tmp_path: Path
) -> None:
    with ThreadedServer(metrics_app(traffic)) as target:
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "900ms", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "clora-serve", "metrics_path": "/metrics",
                                "static_configs": [{"targets": [f"127.0.0.1:{target.port}"]}]}],
        }
        (tmp_path / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
        port = free_port()
        proc = subprocess.Popen(
            [prometheus_binary, f"--config.file={tmp_path / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
             "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            with httpx.Client() as client:

                def ready() -> bool:
                    assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "prometheus exited"
                    try:
                        return client.get(f"{base}/-/ready", timeout=1).status_code == 200
                    except httpx.HTTPError:
                        return False

                wait_for(ready, 20, "prometheus to become ready", interval_s=0.2)

                p50 = 'histogram_quantile(0.5, sum by (le, adapter) (rate(clora_request_latency_seconds_bucket[10s])))'

                def quantiles() -> dict[str, float] | None:
                    result = query(client, base, p50)["result"]
                    values = {r["metric"]["adapter"]: float(r["value"][1]) for r in result}
                    return values if len(values) == 2 and all(v == v for v in values.values()) else None

                values = wait_for(quantiles, 20, "two scrapes with latency samples", interval_s=0.5)
                # adapter-a observes 0.42 s, adapter-b 0.3 s: both lie in the (0.25, 0.5] bucket.
                assert 0.25 < values["adapter-a"] <= 0.5
                assert 0.25 < values["adapter-b"] <= 0.5

                up = query(client, base, 'up{job="clora-serve"}')["result"]
                assert [float(r["value"][1]) for r in up] == [1.0]

                # Every dashboard query is valid PromQL and returns data once traffic was scraped.
                for expr in dashboard_exprs():
                    data = query(client, base, expr.replace("$__rate_interval", "10s"))
                    assert data["result"], f"dashboard query returned no series: {expr}"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
