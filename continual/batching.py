"""Tokenisation of training batches: prompt ids exactly as a server tokenises the prompt, then the answer.

``prompt_ids = tokenizer(prompt)["input_ids"]`` (default special tokens) and the target is
``tokenizer(" " + gold, add_special_tokens=False)["input_ids"] + [eos]``; only target tokens carry loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import Example


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) right-padded
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T), -100 outside the answer
    prompt_ids: list[list[int]]


def prompt_ids(tokenizer, prompts: list[str]) -> list[list[int]]:
    return [list(tokenizer(p)["input_ids"]) for p in prompts]


def make_batch(tokenizer, examples: list[Example], device: torch.device) -> Batch:
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    p_ids = prompt_ids(tokenizer, [ex.prompt for ex in examples])
    rows, labels = [], []
    for ids, ex in zip(p_ids, examples):
        ans = list(tokenizer(" " + ex.gold, add_special_tokens=False)["input_ids"]) + [eos]
        rows.append(ids + ans)
        labels.append([-100] * len(ids) + ans)
    T = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    lab = torch.full((len(rows), T), -100, dtype=torch.long)
    for i, (r, l) in enumerate(zip(rows, labels)):
        input_ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
        lab[i, : len(l)] = torch.tensor(l)
    return Batch(input_ids.to(device), mask.to(device), lab.to(device), p_ids)


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over answer tokens: logits (B, T, V), labels (B, T)."""
    shift_logits = logits[:, :-1].float()  # (B, T-1, V)
    shift_labels = labels[:, 1:]  # (B, T-1)
    return torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]),
                                             shift_labels.reshape(-1), ignore_index=-100)
