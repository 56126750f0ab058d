"""Retraining swaps the model in atomically: route() on another thread keeps answering throughout."""

from __future__ import annotations

import threading
import time

from router.registry import make_router
from tests.router.test_routers import WORDS, examples


def test_route_keeps_working_while_fit_runs_on_another_thread() -> None:
    r = make_router("tfidf")
    ex = examples(40)
    r.fit(ex)
    probe = [ex["sports"][0], ex["finance"][0]]
    stop = threading.Event()
    errors: list[BaseException] = []
    answers: list[tuple[str, ...]] = []

    def serve() -> None:
        try:
            while not stop.is_set():
                answers.append(tuple(d.adapter for d in r.route(probe)))
        except BaseException as e:  # noqa: BLE001 - surfaced by the assert below
            errors.append(e)

    real_build = r._build
    routed_while_fitting: list[int] = []

    def slow_build(texts: list[str], labels: list[str]):  # type: ignore[no-untyped-def]
        start = len(answers)
        model = real_build(texts, labels)
        deadline = time.monotonic() + 10
        while len(answers) < start + 5 and time.monotonic() < deadline:  # hold the fit open until routes land
            time.sleep(0.001)
        routed_while_fitting.append(len(answers) - start)
        return model

    r._build = slow_build  # type: ignore[method-assign]
    t = threading.Thread(target=serve)
    t.start()
    try:
        bigger = dict(ex, cooking2=[s.replace("oven", "grill") for s in ex["cooking"]])
        for i in range(4):
            r.fit(bigger if i % 2 == 0 else ex)  # adapters registered and removed while serving
        served_during_fit = len(answers)
    finally:
        stop.set()
        t.join(timeout=10)
    assert not errors, errors
    assert served_during_fit > 0
    assert len(routed_while_fitting) == 4 and min(routed_while_fitting) >= 5  # route never waited for fit
    assert all(a == ("sports", "finance") for a in answers)
    assert set(r.labels()) == set(WORDS)


def test_concurrent_fits_leave_one_complete_model() -> None:
    r = make_router("tfidf")
    sets = [examples(20, seed=s) for s in range(3)] + [{"x": ["a b"] * 5, "y": ["c d"] * 5}]
    threads = [threading.Thread(target=r.fit, args=(s,)) for s in sets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.labels()) in (sorted(WORDS), ["x", "y"])
    d = r.route(["goal team"])[0]
    assert d.adapter in r.labels() and 0.0 <= d.confidence <= 1.0
