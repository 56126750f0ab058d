"""Router kinds on small synthetic task sets: fit/route/save/load, confidence, removal, registry, no pickle."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from router.base import BASE_ADAPTER, PersistentRouter, Router
from router.errors import RouterStateError
from router.registry import load_router, make_router, router_kinds

WORDS = {
    "sports": "match goal team coach league season striker referee score final".split(),
    "finance": "stock market shares profit bank investor earnings dividend bond rate".split(),
    "cooking": "recipe oven flour butter simmer garlic onion bake sauce pan".split(),
}


def examples(n: int = 30, seed: int = 0) -> dict[str, list[str]]:
    rng = random.Random(seed)
    return {task: [" ".join(rng.choices(w, k=8)) for _ in range(n)] for task, w in WORDS.items()}


def fake_embed(texts: list[str]) -> np.ndarray:
    """Bag-of-topic-words counts plus a little hashed noise: a deterministic stand-in for an encoder."""
    out = np.zeros((len(texts), 8), np.float32)
    for i, t in enumerate(texts):
        for j, w in enumerate(WORDS.values()):
            out[i, j] = sum(tok in w for tok in t.split())
        out[i, 3 + hash(t) % 5] += 0.1
    return out


def build(kind: str) -> PersistentRouter:
    if kind in ("embedding", "base-hidden"):
        return make_router(kind, embed=fake_embed, calibrate_folds=3)
    if kind == "cascade":
        return make_router(kind, embed=fake_embed)
    return make_router(kind)


TRAINED = ["tfidf", "embedding", "base-hidden", "cascade"]
METHODS = {"cascade": ("tfidf", "cascade")}  # the cascade says which stage decided


@pytest.mark.parametrize("kind", TRAINED)
def test_routes_held_out_texts_to_their_adapter(kind: str) -> None:
    r = build(kind)
    assert isinstance(r, Router)
    r.fit(examples())
    test = examples(10, seed=1)
    decisions = r.route([t for ts in test.values() for t in ts])
    expected = [task for task, ts in test.items() for _ in ts]
    assert [d.adapter for d in decisions] == expected
    assert all(d.method in METHODS.get(kind, (kind,)) and 0.0 <= d.confidence <= 1.0 for d in decisions)
    assert np.mean([d.confidence for d in decisions]) > 0.5
    assert sorted(r.labels()) == sorted(WORDS)


@pytest.mark.parametrize("kind", TRAINED)
def test_save_load_round_trip_gives_equal_decisions_and_no_pickle(kind: str, tmp_path: Path) -> None:
    r = build(kind)
    r.fit(examples())
    texts = [t for ts in examples(5, seed=2).values() for t in ts] + ["unrelated words entirely", ""]
    r.save(tmp_path / "r")
    files = sorted(p.name for p in (tmp_path / "r").rglob("*") if p.is_file())
    assert all(p.endswith((".json", ".npz")) for p in files), files
    for p in (tmp_path / "r").rglob("*.npz"):
        with np.load(p, allow_pickle=False) as z:  # raises if any array needed pickle
            [z[k] for k in z.files]
    loaded = load_router(tmp_path / "r", **({"embed": fake_embed} if kind != "tfidf" else {}))
    assert loaded.labels() == r.labels()
    a, b = r.route(texts), loaded.route(texts)
    assert [d.adapter for d in a] == [d.adapter for d in b]
    np.testing.assert_allclose([d.confidence for d in a], [d.confidence for d in b], atol=1e-6)


def test_load_refuses_another_kind(tmp_path: Path) -> None:
    r = build("tfidf")
    r.fit(examples())
    r.save(tmp_path)
    with pytest.raises(RouterStateError, match="tfidf"):
        build("embedding").load(tmp_path)


@pytest.mark.parametrize("kind", TRAINED + ["gates"])
def test_removed_adapter_is_no_longer_chosen(kind: str) -> None:
    if kind == "gates":
        names = list(WORDS)
        r = make_router("gates", gate_scores=lambda ts: fake_embed(ts)[:, :3] + 0.01, adapter_names=names)
    else:
        r = build(kind)
    ex = examples()
    r.fit(ex)
    sports = ex["sports"][:10]
    assert {d.adapter for d in r.route(sports)} == {"sports"}
    del ex["sports"]
    r.fit(ex)
    assert "sports" not in r.labels()
    assert all(d.adapter in ("finance", "cooking") for d in r.route(sports))


def test_unfitted_and_empty_routers_send_to_base() -> None:
    r = build("tfidf")
    assert r.labels() == []
    assert r.route(["anything"]) == [r.route(["x"])[0]]
    d = r.route(["anything"])[0]
    assert (d.adapter, d.method, d.confidence) == (BASE_ADAPTER, "default", 0.0)
    r.fit(examples())
    r.fit({"a": []})  # no adapter with examples: back to the base model
    assert r.route(["goal"])[0].adapter == BASE_ADAPTER


def test_single_adapter_is_chosen_with_full_confidence() -> None:
    r = build("tfidf")
    r.fit({"only": ["some text", "more text"]})
    d = r.route(["whatever"])[0]
    assert (d.adapter, d.confidence) == ("only", 1.0)


def test_base_name_cannot_be_a_target() -> None:
    with pytest.raises(ValueError, match="reserved"):
        build("tfidf").fit({BASE_ADAPTER: ["x"], "a": ["y"]})


def test_registry_names_known_kinds_for_unknown_kind() -> None:
    assert set(router_kinds()) >= {"hint", "tfidf", "embedding", "base-hidden", "gates"}
    with pytest.raises(ValueError, match=r"unknown router kind 'nope'.*tfidf"):
        make_router("nope")


def test_registry_rejects_missing_and_unknown_deps() -> None:
    with pytest.raises(ValueError, match="embed"):
        make_router("base-hidden")
    with pytest.raises(ValueError, match="bogus"):
        make_router("tfidf", bogus=1)


def test_hint_router_never_classifies(tmp_path: Path) -> None:
    r = make_router("hint")
    r.fit(examples())
    assert r.labels() == [] and r.route(["goal"])[0].adapter == BASE_ADAPTER
    r.save(tmp_path)
    assert load_router(tmp_path).kind == "hint"


def test_gates_router_confidence_is_normalised_gate(tmp_path: Path) -> None:
    scores = np.array([[0.2, 0.6, 0.2], [0.0, 0.0, 0.0]])
    r = make_router("gates", gate_scores=lambda ts: scores[: len(ts)], adapter_names=["a", "b", "c"])
    d = r.route(["x", "y"])
    assert (d[0].adapter, d[0].method) == ("b", "gates") and d[0].confidence == pytest.approx(0.6)
    assert (d[1].adapter, d[1].confidence) == (BASE_ADAPTER, 0.0)
    r.fit({"a": ["p"], "c": ["q"]})
    assert r.route(["x"])[0].adapter in ("a", "c") and r.route(["x"])[0].confidence == pytest.approx(0.5)
    r.save(tmp_path)
    r2 = load_router(tmp_path, gate_scores=lambda ts: scores[: len(ts)], adapter_names=["a", "b", "c"])
    assert r2.labels() == ["a", "c"]
    with pytest.raises(ValueError, match="non-negative"):
        make_router("gates", gate_scores=lambda ts: -np.ones((len(ts), 1)), adapter_names=["a"]).route(["x"])


@pytest.mark.parametrize("kind", TRAINED)
def test_confidence_is_lower_for_text_without_task_evidence(kind: str) -> None:
    r = build(kind)
    r.fit(examples())
    clear = r.route([" ".join(WORDS["finance"])])[0]
    vague = r.route(["the of and a to in"])[0]
    assert clear.adapter == "finance" and clear.confidence > 0.9
    assert vague.confidence < clear.confidence
