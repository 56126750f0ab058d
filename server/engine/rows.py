"""One running row of the batch: a request's state between admission and its ``Done``, token by token."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .requests import Delta, Done, GenerationRequest
from .sampling import RowSampler, TextAssembler, TokenLogprob, token_logprobs


@dataclass
class Row:
    req: GenerationRequest
    slot: int  # -1 = base model
    sampler: RowSampler
    text: TextAssembler
    length: int  # tokens in the cache
    end_ids: frozenset[int] = frozenset()  # tokens that end the row: EOS unless ignored, and stop_token_ids
    next_token: int = -1
    generated: int = 0
    first_token_at: float = 0.0
    last_token_at: float = 0.0
    label: str = "__base__"
    pinned: bool = False  # holds a pin on its slot (released exactly once)
    finish: str | None = None
    stop_reason: str | int | None = None  # see Done
    end: TokenLogprob | None = None  # see Done
    timings: dict[str, float] = field(default_factory=dict)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # when the request asked for them
    logprobs_sent: int = 0  # of those, how many went out with deltas
    prompt_logprobs: tuple[TokenLogprob, ...] = ()

    @classmethod
    def admit(cls, req: GenerationRequest, slot: int, tokenizer: object, eos_ids: set[int]) -> Row:
        now = time.perf_counter()
        p, end_ids = req.params, req.params.end_ids(eos_ids)
        return cls(req, slot, RowSampler(p, req.prompt_ids, end_ids),
                   TextAssembler(tokenizer, p.stop, req.deltas, p.include_stop_str_in_output, p.min_tokens),
                   length=len(req.prompt_ids), end_ids=end_ids,
                   label=req.adapter[0] if req.adapter else "__base__", pinned=slot >= 0,
                   timings={"queue_s": now - req.arrived})

    def unsent_logprobs(self) -> tuple[TokenLogprob, ...]:
        out = tuple(self.logprobs[self.logprobs_sent:])
        self.logprobs_sent = len(self.logprobs)
        return out

    def accept(self, token: int, logits: torch.Tensor, max_len: int) -> None:
        """Take the row's next token (``logits``: the distribution it was drawn from, for its logprob): emit the
        text it makes safe, or end the row (an end token, a stop string, ``max_tokens``, the context)."""
        self.generated += 1
        p = self.req.params
        lp = None if p.logprobs is None else token_logprobs(
            logits[None], torch.tensor([token], device=logits.device), p.logprobs)[0]
        if token in self.end_ids:
            self.finish, self.end = "stop", lp
            self.stop_reason = token if token in p.stop_token_ids else None
            return
        if lp is not None:
            self.logprobs.append(lp)
        delta = self.text.add(token)
        if delta and self.req.deltas:
            self.req.emit(Delta(delta, token, self.unsent_logprobs()))
        if self.text.stopped:
            self.finish, self.stop_reason = "stop", self.text.matched
        elif self.generated >= p.max_tokens or self.length + 1 >= max_len:
            self.finish = "length"
        else:
            self.next_token = token

    def close(self) -> None:
        """Answer a finished row: the text still held back (no stop string ended it), then ``Done``."""
        tail = self.text.finish() if self.finish != "stop" or not self.text.stopped else ""
        if tail and self.finish != "cancelled" and self.req.deltas:
            self.req.emit(Delta(tail, -1, self.unsent_logprobs()))
        self.timings.update(ttft_s=self.first_token_at - self.req.arrived,
                            total_s=time.perf_counter() - self.req.arrived)
        self.req.emit(Done(self.finish, len(self.req.prompt_ids), self.generated, self.timings, self.text.text,
                           tuple(self.logprobs), self.prompt_logprobs, self.stop_reason, self.end))
