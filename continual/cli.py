"""``clora train`` and ``clora evaluate``: the continual-training subcommands.

Both are added to the ``clora`` console script by server/cli.py.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .config import TrainConfig
from .data import PROMPT_STYLES
from .errors import ContinualError


def add_train_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``train`` with its options and ``func`` to the ``clora`` subcommands."""
    from .methods import known_methods

    d = TrainConfig()
    p = subparsers.add_parser("train", help="train adapters over a task sequence (continual learning)")
    p.add_argument("--data", required=True, type=Path, help="benchmark dir (manifest.json, task_orders.json)")
    p.add_argument("--order", default=None, help="task order name from task_orders.json (e.g. standard_order1)")
    p.add_argument("--tasks", default=None, help="comma-separated task names (instead of --order)")
    p.add_argument("--method", default="seq", choices=known_methods())
    p.add_argument("--out", required=True, type=Path, help="output dir (metrics, plots, adapters, checkpoints)")
    p.add_argument("--max-train", type=int, default=None, help="train examples per task (seeded subset)")
    p.add_argument("--max-test", type=int, default=None, help="test examples per task (seeded subset)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--rank", type=int, default=d.rank)
    p.add_argument("--alpha", type=float, default=d.alpha)
    p.add_argument("--target-modules", default=",".join(d.target_modules))
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--rehearsal", type=float, default=d.rehearsal, help="replay ratio of earlier tasks' examples")
    p.add_argument("--ewc-lambda", type=float, default=d.ewc_lambda)
    p.add_argument("--olora-lambda", type=float, default=d.olora_lambda)
    p.add_argument("--clora-lambda", type=float, default=d.clora_lambda)
    p.add_argument("--joint-only", action="store_true",
                   help="multitask: train only the joint model on all tasks (earlier rows: the untrained base)")
    p.add_argument("--routing-lr", type=float, default=d.routing_lr, help="C-LoRA: learning rate of R_delta")
    p.add_argument("--clora-project-a", action=argparse.BooleanOptionalAction, default=d.clora_project_a,
                   help="C-LoRA: later tasks also train A, its change projected off old tasks' inputs (GPM)")
    p.add_argument("--clora-project-b", action=argparse.BooleanOptionalAction, default=d.clora_project_b,
                   help="C-LoRA: later tasks also train B, its change projected off the codes old tasks feed it")
    p.add_argument("--gate-hidden", type=int, default=d.gate_hidden)
    p.add_argument("--gate-dim", type=int, default=d.gate_dim)
    p.add_argument("--gate-lr", type=float, default=d.gate_lr, help="GainLoRA gate learning rate")
    p.add_argument("--gate-threshold", type=float, default=d.gate_threshold,
                   help="GainLoRA: GPM energy threshold of the gate memories")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--max-input-chars", type=int, default=d.max_input_chars)
    p.add_argument("--prompt-style", default=d.prompt_style, choices=sorted(PROMPT_STYLES),
                   help="instruction: task instruction + label options + input; raw: the input alone (for routing)")
    p.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    p.add_argument("--name", default="", help="adapter name (prefix for per-task); default: the method name")
    p.add_argument("--base-model", default=None, help="local HF model dir (default: the embedded SmolLM2)")
    p.add_argument("--cache-dir", type=Path, default=None, help="model cache dir (default: the server's setting)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--num-threads", type=int, default=None)
    p.add_argument("--register", default=None, metavar="URL", help="hot-register each export in a running server")
    p.add_argument("--admin-token", default=os.environ.get("CLORA_ADMIN_TOKEN"),
                   help="bearer token for --register (default: $CLORA_ADMIN_TOKEN)")
    p.add_argument("--no-resume", action="store_true", help="ignore checkpoints in --out and start over")
    p.add_argument("--no-progress", action="store_true", help="no progress bars / per-task lines")
    p.set_defaults(func=_train)
    return p


def _train(args: argparse.Namespace) -> int:
    from .data import resolve_tasks
    from .runner import RunSpec, run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = TrainConfig(
            method=args.method, rank=args.rank, alpha=args.alpha,
            target_modules=[m.strip() for m in args.target_modules.split(",") if m.strip()],
            lr=args.lr, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, rehearsal=args.rehearsal,
            ewc_lambda=args.ewc_lambda, max_train=args.max_train, max_test=args.max_test,
            max_input_chars=args.max_input_chars, prompt_style=args.prompt_style,
            max_new_tokens=args.max_new_tokens, eval_batch_size=args.eval_batch_size,
            olora_lambda=args.olora_lambda, clora_lambda=args.clora_lambda,
            gate_hidden=args.gate_hidden, gate_dim=args.gate_dim,
            gate_lr=args.gate_lr, gate_threshold=args.gate_threshold, routing_lr=args.routing_lr,
            clora_project_a=args.clora_project_a,
            clora_project_b=args.clora_project_b, joint_only=args.joint_only, name=args.name,
        )
        tasks = resolve_tasks(args.data, args.order, args.tasks)
        spec = RunSpec(data_dir=args.data, tasks=tasks, out_dir=args.out, cache_dir=_cache_dir(args.cache_dir),
                       base_model=args.base_model, device=args.device, dtype=args.dtype,
                       num_threads=args.num_threads, register_url=args.register, admin_token=args.admin_token,
                       progress=not args.no_progress, resume=not args.no_resume)
        m = run(cfg, spec)
    except ContinualError as e:
        print(f"clora train: error: {e}", file=sys.stderr)
        return 2
    print(f"{m['method']}: AP={m['AP']:.4f} FT={m['FT']:.4f} BWT={m['BWT']:.4f} ({m['seconds']:.0f} s) -> {args.out}")
    return 0


def add_evaluate_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``evaluate``: a finished run's final checkpoint evaluated again (e.g. in float32)."""
    p = subparsers.add_parser("evaluate", help="evaluate a finished `clora train` run again (e.g. in float32)")
    p.add_argument("--run", required=True, type=Path, help="the --out dir of a finished `clora train` run")
    p.add_argument("--data", required=True, type=Path, help="the benchmark dir the run was trained on")
    p.add_argument("--out", type=Path, default=None, help="output dir (default: <run>/evaluations/<dtype>)")
    p.add_argument("--base-model", default=None, help="the run's base model (default: the embedded SmolLM2)")
    p.add_argument("--cache-dir", type=Path, default=None, help="model cache dir (default: the server's setting)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--num-threads", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_evaluate)
    return p


def _evaluate(args: argparse.Namespace) -> int:
    from .reevaluate import EvalSpec, reevaluate

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = args.out or args.run / "evaluations" / args.dtype
    try:
        spec = EvalSpec(run_dir=args.run, data_dir=args.data, out_dir=out, cache_dir=_cache_dir(args.cache_dir),
                        base_model=args.base_model, device=args.device, dtype=args.dtype,
                        num_threads=args.num_threads, progress=not args.no_progress)
        r = reevaluate(spec)
    except ContinualError as e:
        print(f"clora evaluate: error: {e}", file=sys.stderr)
        return 2
    print(f"{r['method']} ({r['dtype']}): AP={r['AP']:.4f} "
          + " ".join(f"{n}={a:.2f}" for n, a in zip(r["tasks"], r["accuracy"])) + f" -> {out}")
    return 0


def _cache_dir(given: Path | None) -> Path:
    if given is not None:
        return given
    from server.settings import Settings

    return Settings().model_cache_dir
