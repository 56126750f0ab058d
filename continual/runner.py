"""The task-sequence runner: train a method task by task, evaluate every task after each, export, checkpoint.

Outputs under ``out_dir``: ``metrics.json``, ``accuracy.png``, ``ap_over_tasks.png``, ``predictions.jsonl`` (the
latest evaluation, one ``{task, prompt, gold, prediction}`` per line), ``adapters/<name>/`` (served formats) and
``checkpoints/task_<t>/``. A run whose ``out_dir`` holds checkpoints of the same config resumes after them.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from base_model.loader import LoadedModel, load_base_model

from .batching import answer_loss, make_batch
from .checkpoint import latest_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import Example, TaskData, load_task
from .errors import ContinualError
from .evaluate import evaluate_all, write_predictions
from .ewc import EWC
from .methods import get_method
from .methods.base import Method
from .metrics import cl_metrics
from .plots import plot_accuracy, plot_ap
from .register import register_adapter

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class ModelChoice:
    """Which base model to load, where, and how (shared by training and re-evaluation)."""

    cache_dir: Path
    base_model: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    num_threads: int | None = None

    def load(self) -> LoadedModel:
        return load_base_model(self.base_model, self.cache_dir, self.device, self.dtype, self.num_threads)


@dataclass(kw_only=True)
class RunSpec(ModelChoice):
    """Where the data, model and outputs are; what to register where."""

    data_dir: Path
    tasks: list[str]
    out_dir: Path
    register_url: str | None = None
    admin_token: str | None = None
    progress: bool = True
    resume: bool = True


def load_tasks(data_dir: Path, names: list[str], cfg: TrainConfig) -> list[TaskData]:
    """The tasks' train/test subsets exactly as ``cfg`` selects and prompts them."""
    return [load_task(data_dir, name, cfg.max_train, cfg.max_test, cfg.seed, cfg.max_input_chars, cfg.prompt_style)
            for name in names]


def method_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors that belong to the method (EWC keeps its own, prefixed ``ewc.``)."""
    return {k: v for k, v in tensors.items() if not k.startswith("ewc.")}


def _rehearsal(method: Method, tasks: list[TaskData], t: int, n_current: int, cfg: TrainConfig) -> list[Example]:
    if cfg.rehearsal <= 0 or t == 0 or not method.uses_rehearsal:
        return []
    pool = [ex for task in tasks[:t] for ex in task.train]
    k = min(len(pool), round(cfg.rehearsal * n_current))
    return random.Random(f"{cfg.seed}:replay:{t}").sample(pool, k)


def _batches(examples: list[Example], bs: int, seed: str) -> list[list[Example]]:
    order = list(examples)
    random.Random(seed).shuffle(order)
    return [order[i: i + bs] for i in range(0, len(order), bs)]


def _train_task(method: Method, model, tok, examples: list[Example], t: int, cfg: TrainConfig, ewc: EWC,
                progress: bool) -> float:
    params = method.begin_task(t)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(method.param_groups(params), lr=cfg.lr, weight_decay=0.0)
    device = next(model.parameters()).device
    last = float("nan")
    for epoch in range(cfg.epochs):
        batches = _batches(examples, cfg.batch_size, f"{cfg.seed}:{t}:{epoch}")
        bar = tqdm(batches, desc=f"{cfg.method} task {t + 1} ({method.tasks[t].name}) epoch {epoch + 1}",
                   disable=not progress, leave=False)
        for chunk in bar:
            b = make_batch(tok, chunk, device)
            method.set_batch(b.prompt_ids)
            out = model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)
            loss = answer_loss(out.logits, b.labels)
            extra = [x for x in (method.penalty(), ewc.penalty(method.shared_params())) if x is not None]
            total = loss + sum(extra) if extra else loss
            opt.zero_grad(set_to_none=True)
            total.backward()
            method.after_backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            method.after_step()
            last = float(loss.detach())
            bar.set_postfix(loss=f"{last:.3f}")
    method.ctx.weights = None
    return last


@torch.no_grad()
def _memory_pass(method: Method, model, tok, examples: list[Example], t: int, bs: int) -> None:
    device = next(model.parameters()).device
    method.start_recording()
    for i in range(0, len(examples), bs):
        b = make_batch(tok, examples[i: i + bs], device)
        method.set_batch(b.prompt_ids)
        if method.memory_forward:
            method.ctx.token_mask = b.attention_mask.bool()
            model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)
    method.ctx.token_mask = None
    method.ctx.weights = None
    method.finish_recording(t)


def _fisher(method: Method, model, tok, examples: list[Example], ewc: EWC, bs: int) -> None:
    params = method.shared_params()
    if not params or ewc.lam == 0:
        return
    device = next(model.parameters()).device
    sq = {k: torch.zeros_like(p) for k, p in params.items()}
    n = 0
    for i in range(0, min(len(examples), 64), bs):
        b = make_batch(tok, examples[i: i + bs], device)
        method.set_batch(b.prompt_ids)
        for p in params.values():
            p.requires_grad_(True)
        grads = torch.autograd.grad(answer_loss(model(input_ids=b.input_ids, attention_mask=b.attention_mask,
                                                      use_cache=False).logits, b.labels), list(params.values()))
        for k, g in zip(params, grads):
            sq[k] += g.detach().pow(2)
        n += 1
    method.ctx.weights = None
    ewc.consolidate(params, sq, n)


def _write_outputs(out: Path, cfg: TrainConfig, tasks: list[str], acc: list[list[float]], seconds: float,
                   exports: dict[str, str], records: list[dict], base_name: str) -> dict:
    done = len(acc)
    m = cl_metrics([row[:done] for row in acc])
    metrics = {"method": cfg.method, "tasks": tasks, "accuracy": acc, **m, "config": cfg.to_json(),
               "seconds": seconds, "completed_tasks": done, "adapters": exports, "base_model": base_name}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    plot_accuracy(acc, tasks, cfg.method, out / "accuracy.png")
    plot_ap(acc, tasks, cfg.method, out / "ap_over_tasks.png")
    write_predictions(out / "predictions.jsonl", records)
    return metrics


def _read_records(out: Path) -> list[dict]:
    with open(out / "predictions.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def run(cfg: TrainConfig, spec: RunSpec) -> dict:
    """Train ``cfg.method`` over ``spec.tasks``; returns the metrics dict also written to ``metrics.json``."""
    out = Path(spec.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    loaded = spec.load()
    model, tok = loaded.model, loaded.tokenizer
    torch.manual_seed(cfg.seed)
    data = load_tasks(spec.data_dir, spec.tasks, cfg)
    method = get_method(cfg.method)(model, cfg, data, loaded.name)
    ewc = EWC(cfg.ewc_lambda)
    acc: list[list[float]] = []
    seconds, start, exports = 0.0, 0, {}
    ck = latest_checkpoint(out) if spec.resume else None
    if ck is not None:
        t_done, tensors, meta = ck
        if TrainConfig.upgrade_json(meta["config"]) != cfg.to_json() or meta["tasks"] != spec.tasks:
            raise ContinualError(f"{out} holds checkpoints of a different run (config or tasks differ); "
                                 "use another --out or pass --no-resume to start over")
        method.load_state(method_tensors(tensors), meta["method"])
        ewc.load(tensors, loaded.device)
        acc, seconds, exports, start = meta["accuracy"], meta["seconds"], meta.get("adapters", {}), t_done + 1
        log.info("resuming %s after task %d (%s)", cfg.method, t_done + 1, spec.tasks[t_done])
    metrics: dict = {}
    records: list[dict] = []
    for t in range(start, len(data)):
        t0 = time.time()
        examples = method.train_examples(t)
        examples = examples + _rehearsal(method, data, t, len(examples), cfg)
        loss = _train_task(method, model, tok, examples, t, cfg, ewc, spec.progress)
        method.end_task(t)
        if method.wants_memory:
            _memory_pass(method, model, tok, data[t].train, t, cfg.eval_batch_size)
        _fisher(method, model, tok, data[t].train, ewc, cfg.batch_size)
        if t > 0 and method.untrained(t) and method.untrained(t - 1):  # the same untrained start as before
            row, records = list(acc[-1]), records or _read_records(out)
        else:
            row, records = evaluate_all(model, tok, method, data, cfg.max_new_tokens, cfg.eval_batch_size,
                                        f"evaluate after task {t + 1}", spec.progress)
        acc.append(row)
        seconds += time.time() - t0
        for name, path in method.export(out / "adapters", t):
            exports[name] = str(path.resolve())
            if spec.register_url:
                register_adapter(spec.register_url, name, path, spec.admin_token)
                log.info("registered %s at %s", name, spec.register_url)
        tensors, mmeta = method.state()
        tensors.update(ewc.state())
        save_checkpoint(out, t, tensors, {"config": cfg.to_json(), "tasks": spec.tasks, "accuracy": acc,
                                          "seconds": seconds, "adapters": exports, "method": mmeta,
                                          "last_loss": loss})
        metrics = _write_outputs(out, cfg, spec.tasks, acc, seconds, exports, records, loaded.name)
        if spec.progress:
            print(f"[{cfg.method}] after task {t + 1}/{len(data)} ({data[t].name}): "
                  + " ".join(f"{n}={a:.2f}" for n, a in zip(spec.tasks, row)), flush=True)
    if not metrics:  # everything was already done: rewrite the summary from the checkpoint
        metrics = json.loads((out / "metrics.json").read_text())
    return metrics
