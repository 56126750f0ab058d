"""Router kinds on the CL benchmark: task identification from raw inputs, calibration, routing latency.

Each router is trained on each task's train split (at most --max-train inputs, ``input`` field only) and scored
on the test split (``--split dev`` for tuning; never tune on test). Prints, per kind: accuracy on the 4
standard tasks (router trained on those 4), on all 15 tasks (router trained on all 15), expected calibration
error, p50/p95 latency of one single-text route() call; then per-task accuracy and the confusion between the
four sentiment tasks for every kind.

    python bench/router.py --data ../shared/data/cl_benchmark --max-train 200 --kinds tfidf,embedding,base-hidden
"""

from __future__ import annotations

import argparse
import os
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from router.calibration import expected_calibration_error  # noqa: E402
from router.registry import make_router  # noqa: E402
from base_model.loader import DEFAULT_CACHE_DIR  # noqa: E402

STANDARD = ["dbpedia", "amazon", "yahoo", "agnews"]
SENTIMENT = ["amazon", "yelp", "imdb", "sst2"]


def read_inputs(path: Path, limit: int | None) -> list[str]:
    out: list[str] = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            out.append(json.loads(line)["input"])
            if limit is not None and len(out) >= limit:
                break
    return out


def all_tasks(data: Path) -> list[str]:
    return sorted(p.name for p in data.iterdir() if (p / "train.jsonl").is_file())


def base_hidden_embed(layer: int | None, max_tokens: int, dtype: str) -> Callable[[list[str]], np.ndarray]:
    """The resident model as the server holds it: same dtype choice, base linears packed the same way."""
    from base_model.loader import load_base_model
    from base_model.packed_linear import pack_model_linears
    from router.base_hidden import hidden_state_embedder

    loaded = load_base_model(None, Path(os.environ.get("CLORA_MODEL_CACHE_DIR", DEFAULT_CACHE_DIR)), "cpu", dtype)
    pack_model_linears(loaded.model)
    print(f"base-hidden encoder: {loaded.name} {loaded.dtype}", flush=True)
    return hidden_state_embedder(loaded.model, loaded.tokenizer, layer=layer, max_tokens=max_tokens)


def router_deps(kind: str, args: argparse.Namespace, cache: dict[str, Any]) -> dict[str, Any]:
    """Encoders are built once per kind and reused for the 4-task and 15-task runs."""
    if kind == "embedding":
        if "embedding" not in cache:
            from router.embedding import minilm_embedder

            kw = {"max_tokens": args.embed_max_tokens} if args.embed_max_tokens else {}
            cache["embedding"] = minilm_embedder(dtype=args.dtype, **kw)
        return {"embed": cache["embedding"]}
    if kind in ("base-hidden", "cascade"):
        key = f"base-hidden:{args.layer}:{args.max_tokens}"
        if key not in cache:
            cache[key] = base_hidden_embed(args.layer, args.max_tokens, args.dtype)
        return {"embed": cache[key]}
    return {}


def evaluate(kind: str, tasks: list[str], args: argparse.Namespace, cache: dict[str, Any]) -> dict[str, Any]:
    router = make_router(kind, **router_deps(kind, args, cache))
    train = {t: read_inputs(args.data / t / "train.jsonl", args.max_train) for t in tasks}
    t0 = time.perf_counter()
    router.fit(train)
    fit_s = time.perf_counter() - t0
    gold: list[str] = []
    texts: list[str] = []
    for t in tasks:
        xs = read_inputs(args.data / t / f"{args.split}.jsonl", args.max_test)
        texts += xs
        gold += [t] * len(xs)
    decisions = router.route(texts)
    pred = np.array([d.adapter for d in decisions])
    conf = np.array([d.confidence for d in decisions])
    g = np.array(gold)
    lat = []
    rng = np.random.default_rng(0)
    for i in rng.choice(len(texts), size=min(args.latency_n, len(texts)), replace=False):
        s = time.perf_counter()
        router.route([texts[i]])
        lat.append((time.perf_counter() - s) * 1e3)
    return {
        "acc": float((pred == g).mean()),
        "per_task": {t: float((pred[g == t] == t).mean()) for t in tasks},
        "ece": expected_calibration_error(conf, pred == g),
        "low_conf": float((conf < 0.5).mean()),
        "escalated": float(np.mean([d.method == "cascade" for d in decisions])),
        "p50": float(np.percentile(lat, 50)), "p95": float(np.percentile(lat, 95)),
        "fit_s": fit_s, "gold": g, "pred": pred,
    }


def confusion(res: dict[str, Any], tasks: list[str]) -> str:
    g, p = res["gold"], res["pred"]
    cols = tasks + ["other"]
    lines = ["gold \\ routed  " + " ".join(f"{c:>7}" for c in cols)]
    for t in tasks:
        row = p[g == t]
        counts = [int((row == c).sum()) for c in tasks] + [int((~np.isin(row, tasks)).sum())]
        lines.append(f"{t:<14} " + " ".join(f"{c:>7}" for c in counts))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cl_benchmark")
    ap.add_argument("--max-train", type=int, default=200)
    ap.add_argument("--max-test", type=int, default=None, help="cap per task on the evaluation split")
    ap.add_argument("--split", default="test", choices=["test", "dev"])
    ap.add_argument("--kinds", default="tfidf,cascade,embedding,base-hidden")
    ap.add_argument("--layer", type=int, default=None, help="base-hidden: decoder layers run (default: router's)")
    ap.add_argument("--max-tokens", type=int, default=None, help="base-hidden: tokens pooled (default: router's)")
    ap.add_argument("--latency-n", type=int, default=200)
    ap.add_argument("--embed-max-tokens", type=int, default=None, help="embedding: word pieces encoded (default: "
                    "the encoder's)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="auto", help="encoders' dtype, as CLORA_DTYPE (auto: bf16 on CPUs with "
                    "fast bf16, as the server picks)")
    args = ap.parse_args()

    import torch

    from router.base_hidden import DEFAULT_LAYER, DEFAULT_MAX_TOKENS

    torch.set_num_threads(args.threads)
    args.layer = DEFAULT_LAYER if args.layer is None else args.layer
    args.max_tokens = DEFAULT_MAX_TOKENS if args.max_tokens is None else args.max_tokens
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    tasks15 = all_tasks(args.data)
    cache: dict[str, Any] = {}
    results: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
    for kind in kinds:
        r4 = evaluate(kind, STANDARD, args, cache)
        r15 = evaluate(kind, tasks15, args, cache)
        results[kind] = (r4, r15)
        print(f"[{kind}] std4 {r4['acc']:.4f}  all{len(tasks15)} {r15['acc']:.4f}  (fit {r4['fit_s']:.1f}s / "
              f"{r15['fit_s']:.1f}s)", flush=True)

    print(f"\nsplit={args.split} max_train={args.max_train} threads={args.threads} "
          f"base-hidden layer={args.layer} max_tokens={args.max_tokens}")
    print(f"{'kind':<12} {'std4 acc':>9} {'all15 acc':>10} {'ECE15':>7} {'conf<.5':>8} {'p50 ms':>8} {'p95 ms':>8} "
          f"{'escalated':>9}")
    for kind, (r4, r15) in results.items():
        print(f"{kind:<12} {r4['acc']:>9.4f} {r15['acc']:>10.4f} {r15['ece']:>7.4f} {r15['low_conf']:>8.3f} "
              f"{r15['p50']:>8.2f} {r15['p95']:>8.2f} {r15['escalated']:>9.3f}")
    print("\nper-task accuracy (router trained on the 4 standard tasks | on all 15)")
    print(f"{'task':<10} " + " ".join(f"{k:>22}" for k in results))
    for t in tasks15:
        cells = []
        for r4, r15 in results.values():
            a4 = f"{r4['per_task'][t]:.3f}" if t in r4["per_task"] else "-"
            cells.append(f"{a4:>10} | {r15['per_task'][t]:.3f}")
        print(f"{t:<10} " + " ".join(f"{c:>22}" for c in cells))
    for kind, (_, r15) in results.items():
        print(f"\nsentiment confusion, {kind} (15-task router):\n{confusion(r15, SENTIMENT)}")


if __name__ == "__main__":
    main()
