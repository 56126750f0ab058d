"""Continual-learning metrics (AP, FT, BWT as the data README defines them) and exact-match scoring."""

from __future__ import annotations

import re

_WS = re.compile(r"\s+")


def normalise(text: str) -> str:
    """Lower-case, collapse whitespace, strip surrounding whitespace and trailing punctuation."""
    return _WS.sub(" ", text).strip().strip(".").strip().lower()


def exact_match(prediction: str, gold: str) -> bool:
    return normalise(prediction) == normalise(gold)


def cl_metrics(acc: list[list[float]]) -> dict[str, float]:
    """AP, FT, BWT of a lower-triangular-complete accuracy matrix ``acc[i][j]`` (after task i, on task j).

    AP  = mean_j a[T][j];  FT = mean_{j<T} (max_{i<T} a[i][j] - a[T][j]);  BWT = mean_{j<T} (a[T][j] - a[j][j]).
    With a single task FT and BWT are 0.
    """
    T = len(acc)
    if T == 0 or any(len(row) != T for row in acc):
        raise ValueError(f"accuracy must be a square T x T matrix, got {[len(r) for r in acc]}")
    last = acc[-1]
    ap = sum(last) / T
    if T == 1:
        return {"AP": ap, "FT": 0.0, "BWT": 0.0}
    ft = sum(max(acc[i][j] for i in range(T - 1)) - last[j] for j in range(T - 1)) / (T - 1)
    bwt = sum(last[j] - acc[j][j] for j in range(T - 1)) / (T - 1)
    return {"AP": ap, "FT": ft, "BWT": bwt}
