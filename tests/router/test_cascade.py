"""The cascade router: TF-IDF alone when sure, the product with the dense stage otherwise."""

from __future__ import annotations

import numpy as np
import pytest

from router.cascade import CascadeRouter
from tests.router.test_routers import WORDS, examples, fake_embed


class CountingEmbed:
    def __init__(self) -> None:
        self.texts: list[str] = []

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.texts += texts
        return fake_embed(texts)


def test_confident_texts_never_reach_the_dense_stage() -> None:
    embed = CountingEmbed()
    r = CascadeRouter(embed, escalate_below=0.0)
    r.fit(examples())
    embed.texts.clear()
    decisions = r.route([" ".join(w) for w in WORDS.values()])
    assert embed.texts == []
    assert [d.adapter for d in decisions] == list(WORDS) and {d.method for d in decisions} == {"tfidf"}


def test_unsure_texts_are_decided_by_the_product_of_both_stages() -> None:
    embed = CountingEmbed()
    r = CascadeRouter(embed, escalate_below=0.999)
    r.fit(examples())
    texts = ["goal stock oven", "the of and", "recipe oven goal", " ".join(WORDS["finance"])]
    labels, p1 = r.first.distribution(texts)
    unsure = [i for i in range(len(texts)) if p1[i].max() < 0.999]
    assert 2 <= len(unsure) < len(texts)  # the mixed texts escalate, the plain finance one does not
    embed.texts.clear()
    decisions = r.route(texts)
    assert embed.texts == [texts[i] for i in unsure]
    _, p2 = r.second.distribution(texts)
    joint = p1 * p2 / (p1 * p2).sum(axis=1, keepdims=True)
    for i, d in enumerate(decisions):
        expected = joint[i] if i in unsure else p1[i]
        assert d.adapter == labels[int(expected.argmax())]
        assert d.confidence == pytest.approx(float(expected.max()))
        assert d.method == ("cascade" if i in unsure else "tfidf")


def test_escalation_threshold_is_checked() -> None:
    with pytest.raises(ValueError, match="escalate_below"):
        CascadeRouter(fake_embed, escalate_below=1.5)
