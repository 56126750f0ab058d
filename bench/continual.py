"""Continual-learning benchmark: every method on one task order; prints AP / FT / BWT / minutes per method.

    python bench/continual.py --data ../shared/data/cl_benchmark --order standard_order1 \
        --max-train 300 --max-test 100 --out runs/bench

Each method's full outputs (metrics.json, plots, predictions, adapters) land in ``<out>/<method>/``; a finished
method is resumed from its checkpoints, so re-running only fills in what is missing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from continual.config import TrainConfig  # noqa: E402
from continual.data import resolve_tasks  # noqa: E402
from continual.methods import known_methods  # noqa: E402
from continual.runner import RunSpec, run  # noqa: E402

ORDER = ["seq", "per-task", "multitask", "olora", "clora", "gainlora"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/cl_benchmark")
    ap.add_argument("--order", default="standard_order1")
    ap.add_argument("--tasks", default=None)
    ap.add_argument("--methods", default=",".join(ORDER))
    ap.add_argument("--max-train", type=int, default=300)
    ap.add_argument("--max-test", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--eval-batch-size", type=int, default=32)
    ap.add_argument("--max-input-chars", type=int, default=1000)
    ap.add_argument("--base-model", default=None)
    ap.add_argument("--cache-dir", type=Path, default=Path(__file__).resolve().parents[1] / ".model_cache")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--num-threads", type=int, default=None)
    ap.add_argument("--joint-only", action="store_true", help="multitask trains only its joint (last-row) model")
    ap.add_argument("--out", type=Path, default=Path("runs/bench"))
    args = ap.parse_args(argv)
    tasks = resolve_tasks(args.data, None if args.tasks else args.order, args.tasks)
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(known_methods())
    if unknown:
        ap.error(f"unknown methods {sorted(unknown)}")
    rows = []
    for m in methods:
        cfg = TrainConfig(method=m, rank=args.rank, lr=args.lr, epochs=args.epochs, batch_size=args.batch_size,
                          max_train=args.max_train, max_test=args.max_test, eval_batch_size=args.eval_batch_size,
                          max_input_chars=args.max_input_chars, joint_only=args.joint_only and m == "multitask")
        spec = RunSpec(data_dir=args.data, tasks=tasks, out_dir=args.out / m, cache_dir=args.cache_dir,
                       base_model=args.base_model, device=args.device, dtype=args.dtype,
                       num_threads=args.num_threads, progress=False)
        res = run(cfg, spec)
        rows.append(res)
        print(json.dumps({k: res[k] for k in ("method", "AP", "FT", "BWT", "seconds", "accuracy")}), flush=True)
    print(f"\ntasks: {' -> '.join(tasks)}; {args.max_train} train / {args.max_test} test per task, "
          f"{args.epochs} epoch(s), rank {args.rank}, lr {args.lr}")
    print(f"{'method':<10} {'AP':>6} {'FT':>6} {'BWT':>7} {'minutes':>8}")
    for r in rows:
        print(f"{r['method']:<10} {r['AP']:6.3f} {r['FT']:6.3f} {r['BWT']:7.3f} {r['seconds'] / 60:8.1f}")
    mt = next((r for r in rows if r["method"] == "multitask"), None)
    if mt and mt["AP"] > 0:
        print("AP / multitask AP: " + ", ".join(f"{r['method']} {r['AP'] / mt['AP']:.2f}" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
