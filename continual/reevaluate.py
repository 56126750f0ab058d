"""Evaluate a finished run's last checkpoint again, under another dtype or device (``clora evaluate``).

Training on this CPU runs in bfloat16, where a batch's rows differ from the same rows alone in the last bits, so a
server's greedy tokens can part from the trainer's on near ties. Evaluating the final state with the base model
loaded in float32 gives predictions a float32 server reproduces exactly. The run's config (tasks, test subset,
prompt style, max new tokens) is read from its checkpoint; the outputs go to their own directory and leave the
run's own files as they are:

    <out>/predictions.jsonl   one {task, prompt, gold, prediction} per line, as the trainer writes it
    <out>/evaluation.json     {run, method, tasks, dtype, device, accuracy (one row), AP, seconds}
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import latest_checkpoint
from .config import TrainConfig
from .errors import ContinualError
from .evaluate import evaluate_all, write_predictions
from .methods import get_method
from .runner import ModelChoice, load_tasks, method_tensors


@dataclass(kw_only=True)
class EvalSpec(ModelChoice):
    """The run to evaluate again, its data, where the outputs go; the base model loaded for it."""

    run_dir: Path
    data_dir: Path
    out_dir: Path
    dtype: str = "float32"
    progress: bool = True


def reevaluate(spec: EvalSpec) -> dict:
    """Evaluate the run's final checkpoint on every task's test split; returns what ``evaluation.json`` holds."""
    ck = latest_checkpoint(spec.run_dir)
    if ck is None:
        raise ContinualError(f"{spec.run_dir} holds no checkpoint: give the --out dir of a `clora train` run")
    t_done, tensors, meta = ck
    cfg = TrainConfig(**TrainConfig.upgrade_json(meta["config"]))
    tasks = meta["tasks"]
    if t_done + 1 != len(tasks):
        raise ContinualError(f"{spec.run_dir} stopped after task {t_done + 1} of {len(tasks)}: "
                             "finish it with the same `clora train` command first")
    t0 = time.time()
    loaded = spec.load()
    torch.manual_seed(cfg.seed)
    data = load_tasks(spec.data_dir, tasks, cfg)
    method = get_method(cfg.method)(loaded.model, cfg, data, loaded.name)
    method.load_state(method_tensors(tensors), meta["method"])
    row, records = evaluate_all(loaded.model, loaded.tokenizer, method, data, cfg.max_new_tokens,
                                cfg.eval_batch_size, "evaluate", spec.progress)
    out = Path(spec.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_predictions(out / "predictions.jsonl", records)
    result = {"run": str(Path(spec.run_dir).resolve()), "method": cfg.method, "tasks": tasks,
              "dtype": str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
              "device": str(loaded.device), "accuracy": row, "AP": sum(row) / len(row),
              "seconds": time.time() - t0}
    (out / "evaluation.json").write_text(json.dumps(result, indent=1))
    return result
