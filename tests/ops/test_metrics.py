"""Metrics: hooks render the documented names, labels stay on the allow-list, hooks never raise, and the
dashboard and docs refer only to metrics that exist."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "clora.json"
DOCS = ROOT / "docs" / "metrics.md"


def exercise(metrics: Metrics) -> None:
    """Call every hook once with plausible values."""
    metrics.request_done("/v1/chat/completions", "adapter-a", "tfidf", 200, 0.42)
    metrics.ttft("adapter-a", 0.05)
    metrics.inter_token("adapter-a", 0.02)
    metrics.queue_wait(0.003)
    metrics.tokens("adapter-a", 12, 30)
    metrics.engine_state(running=3, waiting=2, batch_size=3)
    metrics.decode_step(3)
    metrics.decode_step(16)
    metrics.adapters_resident("cpu", 4)
    metrics.adapters_resident("slot", 2)
    metrics.slot_rows(24, 488)
    metrics.adapter_loaded("adapter-a", "slot", 0.12)
    metrics.adapter_evicted("slot")
    metrics.routed("tfidf", 0.83)
    metrics.routed("explicit", None)
    metrics.cache_hit()
    metrics.cache_miss()
    metrics.cache_error("timeout")
    metrics.cache_skip("too_large")
    metrics.cache_up(False)


def sample_names(metrics: Metrics) -> set[str]:
    payload, _ = metrics.render()
    return {s.name for fam in text_string_to_metric_families(payload.decode()) for s in fam.samples}


def family_names(metrics: Metrics) -> set[str]:
    """Metric names as documented: counters with ``_total``, others bare; ``_created`` series left out."""
    payload, _ = metrics.render()
    names = set()
    for fam in text_string_to_metric_families(payload.decode()):
        if fam.name.endswith("_created"):
            continue
        names.add(fam.name + "_total" if fam.type == "counter" else fam.name)
    return names


def dashboard_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    exprs = []
    for panel in doc["panels"]:
        for target in panel.get("targets", []):
            exprs.append(target["expr"])
    return exprs


def test_render_has_content_type_and_every_family() -> None:
    metrics = Metrics(["adapter-a"])
    exercise(metrics)
    payload, content_type = metrics.render()
    assert content_type.startswith("text/plain; version=")
    names = sample_names(metrics)
    for expected in [
        "clora_requests_total", "clora_request_latency_seconds_bucket", "clora_ttft_seconds_count",
        "clora_inter_token_latency_seconds_sum", "clora_queue_wait_seconds_bucket", "clora_prompt_tokens_total",
        "clora_generated_tokens_total", "clora_requests_running", "clora_requests_waiting", "clora_batch_size",
        "clora_decode_step_rows_bucket", "clora_adapters_resident", "clora_slot_rank_rows", "clora_adapter_loads_total", "clora_adapter_evictions_total",
        "clora_adapter_load_seconds_bucket", "clora_routing_decisions_total", "clora_routing_confidence_bucket",
        "clora_cache_hits_total", "clora_cache_misses_total", "clora_cache_errors_total",
        "clora_cache_skipped_total", "clora_cache_backend_up",
    ]:
        assert expected in names, expected
    assert all(n.startswith("clora_") for n in names)
    reg = metrics.registry
    labels = {"endpoint": "/v1/chat/completions", "adapter": "adapter-a", "method": "tfidf", "status": "200"}
    assert reg.get_sample_value("clora_requests_total", labels) == 1
    assert reg.get_sample_value("clora_generated_tokens_total", {"adapter": "adapter-a"}) == 30
    assert reg.get_sample_value("clora_adapters_resident", {"tier": "cpu"}) == 4
    assert reg.get_sample_value("clora_slot_rank_rows", {"state": "free"}) == 488
    assert reg.get_sample_value("clora_batch_size") == 3
    assert reg.get_sample_value("clora_decode_step_rows_sum") == 19
    assert reg.get_sample_value("clora_decode_step_rows_bucket", {"le": "4.0"}) == 1
    assert reg.get_sample_value("clora_routing_decisions_total", {"method": "explicit"}) == 1
    assert reg.get_sample_value("clora_routing_confidence_count", {"method": "explicit"}) is None
    assert reg.get_sample_value("clora_cache_backend_up") == 0


def test_unknown_adapter_label_becomes_other() -> None:
    metrics = Metrics(["adapter-a"])
    metrics.tokens("adapter-a", 1, 1)
    metrics.tokens("__base__", 1, 1)
    metrics.tokens("evil-{client}-name", 5, 7)
    metrics.ttft("never-registered", 0.1)
    metrics.request_done("/v1/completions", "never-registered", "hint", 404, 0.01)
    metrics.adapter_loaded("never-registered", "cpu", 0.1)
    payload = metrics.render()[0].decode()
    assert "evil" not in payload and "never-registered" not in payload
    reg = metrics.registry
    assert reg.get_sample_value("clora_prompt_tokens_total", {"adapter": "__other__"}) == 5
    assert reg.get_sample_value("clora_prompt_tokens_total", {"adapter": "__base__"}) == 1
    assert reg.get_sample_value("clora_ttft_seconds_count", {"adapter": "__other__"}) == 1
    metrics.set_known_adapters(["adapter-a", "never-registered"])  # registered later: now its own label
    metrics.ttft("never-registered", 0.1)
    assert reg.get_sample_value("clora_ttft_seconds_count", {"adapter": "never-registered"}) == 1


def test_failing_hook_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics(["a"])
    with caplog.at_level(logging.WARNING, logger="server.metrics"):
        metrics.tokens("a", -1, 5)  # counters refuse negative increments
        metrics.ttft("a", "not-a-number")  # type: ignore[arg-type]
        metrics.engine_state(running=None, waiting=0, batch_size=0)  # type: ignore[arg-type]
    failed = [r for r in caplog.records if "metrics hook" in r.getMessage()]
    assert {r.getMessage() for r in failed} == {
        "metrics hook tokens failed (ignored)", "metrics hook ttft failed (ignored)",
        "metrics hook engine_state failed (ignored)",
    }
    assert all(r.exc_info for r in failed)
    metrics.tokens("a", 2, 3)  # the metrics still work afterwards
    assert metrics.registry.get_sample_value("clora_generated_tokens_total", {"adapter": "a"}) == 3


def test_instances_do_not_share_a_registry() -> None:
    one, two = Metrics(), Metrics()
    one.cache_hit()
    assert one.registry.get_sample_value("clora_cache_hits_total") == 1
    assert two.registry.get_sample_value("clora_cache_hits_total") == 0


def test_every_dashboard_metric_exists() -> None:
    metrics = Metrics(["adapter-a"])
    exercise(metrics)
    exported = sample_names(metrics)
    referenced = {m for expr in dashboard_exprs() for m in re.findall(r"\bclora_[a-z0-9_]+", expr)}
    assert len(referenced) >= 15
    assert referenced <= exported, f"dashboard refers to unknown metrics: {sorted(referenced - exported)}"


def test_dashboard_covers_the_required_panels() -> None:
    doc = json.loads(DASHBOARD.read_text())
    assert doc["uid"] == "clora-serve"
    exprs = "\n".join(dashboard_exprs())
    for needle in [
        "histogram_quantile(0.5, sum by (le, adapter) (rate(clora_request_latency_seconds_bucket",
        "histogram_quantile(0.95, sum by (le, adapter) (rate(clora_request_latency_seconds_bucket",
        "histogram_quantile(0.99, sum by (le, adapter) (rate(clora_request_latency_seconds_bucket",
        "histogram_quantile(0.99, sum by (le, adapter) (rate(clora_ttft_seconds_bucket",
        "rate(clora_generated_tokens_total", "clora_cache_hits_total", "clora_batch_size", "clora_requests_waiting",
        "clora_adapter_loads_total", "clora_adapter_evictions_total", "clora_routing_decisions_total",
    ]:
        assert needle in exprs, needle
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    for panel in doc["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "clora-prometheus"


def test_docs_table_lists_exactly_the_metrics() -> None:
    metrics = Metrics()
    exercise(metrics)
    rows = re.findall(r"^\| `(clora_[a-z0-9_]+)` \| (counter|gauge|histogram) \|", DOCS.read_text(), re.M)
    documented = {name for name, _ in rows}
    assert documented == family_names(metrics)
