"""Greedy evaluation with the plain HF forward (what a server reproduces from the prompt string).

Each prompt is tokenised alone (``tokenizer(prompt)["input_ids"]``), rows are left-padded into a batch, decoded
greedily for ``max_new_tokens``, cut at the first EOS and then at the first newline; exact match after
``metrics.normalise``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .batching import prompt_ids
from .data import Example, TaskData
from .metrics import exact_match


def cut(text: str) -> str:
    return text.split("\n", 1)[0]


@torch.no_grad()
def greedy_generate(model, tokenizer, method, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy completions of ``prompts`` (already cut at EOS/newline), in order."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    device = next(model.parameters()).device
    out: list[str] = []
    for s in range(0, len(prompts), batch_size):
        ids = prompt_ids(tokenizer, prompts[s: s + batch_size])
        method.set_batch(ids)
        L = max(len(r) for r in ids)
        input_ids = torch.full((len(ids), L), pad, dtype=torch.long)
        mask = torch.zeros(len(ids), L, dtype=torch.long)
        for i, r in enumerate(ids):
            input_ids[i, L - len(r):] = torch.tensor(r)
            mask[i, L - len(r):] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        position_ids = (mask.cumsum(-1) - 1).clamp_min(0)  # (B, L): left padding does not shift positions
        past = None
        done = torch.zeros(len(ids), dtype=torch.bool, device=device)
        new_tokens: list[torch.Tensor] = []
        cur_ids, cur_pos = input_ids, position_ids
        for _ in range(max_new_tokens):
            res = model(input_ids=cur_ids, attention_mask=mask, position_ids=cur_pos, past_key_values=past,
                        use_cache=True)
            past = res.past_key_values
            nxt = res.logits[:, -1].argmax(-1)  # (B,)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            new_tokens.append(nxt)
            done |= nxt == eos
            if bool(done.all()):
                break
            cur_ids = nxt[:, None]
            cur_pos = cur_pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        gen = torch.stack(new_tokens, 1).tolist()  # (B, n)
        for row in gen:
            if eos in row:
                row = row[: row.index(eos)]
            out.append(cut(tokenizer.decode(row, skip_special_tokens=True)))
    method.ctx.weights = None
    return out


def evaluate_task(model, tokenizer, method, examples: list[Example], max_new_tokens: int,
                  batch_size: int) -> tuple[float, list[dict]]:
    """Accuracy on ``examples`` and their ``{task, prompt, gold, prediction}`` records."""
    preds = greedy_generate(model, tokenizer, method, [ex.prompt for ex in examples], max_new_tokens, batch_size)
    recs = [{"task": ex.task, "prompt": ex.prompt, "gold": ex.gold, "prediction": p} for ex, p in zip(examples, preds)]
    acc = sum(exact_match(p, ex.gold) for ex, p in zip(examples, preds)) / max(len(examples), 1)
    return acc, recs


def evaluate_all(model, tokenizer, method, tasks: list[TaskData], max_new_tokens: int, batch_size: int,
                 desc: str, progress: bool) -> tuple[list[float], list[dict]]:
    """Every task's test accuracy (one accuracy-matrix row) and all their prediction records, task by task."""
    row: list[float] = []
    records: list[dict] = []
    for j, task in enumerate(tqdm(tasks, desc=desc, disable=not progress, leave=False)):
        with method.evaluating(j):
            acc, recs = evaluate_task(model, tokenizer, method, task.test, max_new_tokens, batch_size)
        row.append(acc)
        records += recs
    return row, records


def write_predictions(path: Path, records: list[dict]) -> None:
    """``predictions.jsonl``: one ``{task, prompt, gold, prediction}`` per line."""
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
