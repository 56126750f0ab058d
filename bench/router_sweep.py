"""base-hidden settings sweep: task identification for each (layers run, tokens pooled), base-hidden and cascade.

    python bench/router_sweep.py --split dev --layers 5,6,7,8 --tokens 32,48,64

One forward per text (the deepest layer, the most tokens) gives every setting: attention is causal, so the states
of the first n tokens do not depend on later ones, and the state after layer L is the model's own (normed as the
router sees it). Choose on ``dev``; ``bench/router.py`` reports the chosen default on ``test``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.router import STANDARD, read_inputs  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cl_benchmark")
    ap.add_argument("--split", default="dev", choices=["dev", "test"])
    ap.add_argument("--max-train", type=int, default=200)
    ap.add_argument("--layers", default="5,6,7,8")
    ap.add_argument("--tokens", default="32,48,64")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    layers = sorted(int(x) for x in args.layers.split(","))
    tokens = sorted(int(x) for x in args.tokens.split(","))

    import torch

    from base_model.loader import DEFAULT_CACHE_DIR, load_base_model
    from router.base_hidden import truncated_decoder
    from router.registry import make_router

    torch.set_num_threads(args.threads)
    loaded = load_base_model(None, Path(DEFAULT_CACHE_DIR), "cpu", "auto")
    tok, inner = loaded.tokenizer, loaded.model.model
    decoder = truncated_decoder(loaded.model, layers[-1])
    train = {t: read_inputs(args.data / t / "train.jsonl", args.max_train) for t in STANDARD}
    evals = {t: read_inputs(args.data / t / f"{args.split}.jsonl", None) for t in STANDARD}
    texts = sorted({x for split in (train, evals) for xs in split.values() for x in xs})
    vectors: dict[tuple[int, int], dict[str, np.ndarray]] = {}
    t0 = time.perf_counter()
    with torch.inference_mode():
        for text in texts:
            ids = tok(text, add_special_tokens=False)["input_ids"][: tokens[-1]] or [tok.eos_token_id]
            states = decoder(input_ids=torch.tensor([ids]), output_hidden_states=True, use_cache=False).hidden_states
            for L in layers:  # hidden_states[L]: after L layers; the last one already has the final norm
                h = states[L] if L == layers[-1] else inner.norm(states[L])
                for n in tokens:
                    vectors.setdefault((L, n), {})[text] = h[0, :n].float().mean(0).numpy()
    print(f"{len(texts)} texts encoded in {time.perf_counter() - t0:.0f} s ({loaded.dtype})")
    gold = [t for t in STANDARD for _ in evals[t]]
    xs = [x for t in STANDARD for x in evals[t]]
    print(f"{'layers':>6} {'tokens':>6} {'base-hidden':>12} {'cascade':>8}   ({args.split}, {len(xs)} texts)")
    for (L, n), table in sorted(vectors.items()):
        accs = []
        for kind in ("base-hidden", "cascade"):
            router = make_router(kind, embed=lambda ts, table=table: np.stack([table[t] for t in ts]))
            router.fit(train)
            accs.append(np.mean([d.adapter == g for d, g in zip(router.route(xs), gold)]))
        print(f"{L:>6} {n:>6} {accs[0]:>12.4f} {accs[1]:>8.4f}", flush=True)


if __name__ == "__main__":
    main()
