"""What travels between the HTTP side and the engine thread: a request in, events out."""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .sampling import SamplingParams, TokenLogprob

_ids = itertools.count(1)


class Overloaded(Exception):
    """The waiting queue is full; retry later."""

    def __init__(self, waiting: int, retry_after_s: int = 1) -> None:
        super().__init__(f"server is at capacity ({waiting} requests waiting); retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class Delta:
    """New text and the token that completed it; ``logprobs``: of the tokens since the previous delta, when the
    request asked for them."""

    text: str
    token_id: int
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Done:
    finish_reason: str  # stop | length | cancelled
    prompt_tokens: int
    completion_tokens: int
    timings: dict[str, float]
    text: str = ""  # the whole text: the deltas joined, or the only text a request without deltas gets
    logprobs: tuple[TokenLogprob, ...] = ()  # of every output token but EOS, when the request asked for them
    prompt_logprobs: tuple[TokenLogprob, ...] = ()  # of the prompt's tokens after the first, when asked for
    stop_reason: str | int | None = None  # vLLM's: the stop string or stop token id that ended it (None: EOS)
    end: TokenLogprob | None = None  # the token that ended it (EOS or a stop token id), when logprobs were asked


@dataclass(frozen=True)
class Failed:
    message: str


Event = Delta | Done | Failed


@dataclass
class GenerationRequest:
    """One generation: prompt ids, the adapter version it runs on (None = base), and sampling params.

    ``emit`` is called from the engine thread for every event; it must not block. ``deltas=False``: no Delta
    events, only ``Done`` with the whole text (as vLLM's final-only outputs): a step then wakes no other thread
    per row, and a thread woken mid-step holds the interpreter lock between the step's ops (measured on the
    decode-step bench, a thread running ~50 us of Python per ms took mixed steps from 0.86 to 0.80 of base).
    """

    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]
    adapter: tuple[str, int] | None = None
    deltas: bool = True
    rank_weights: torch.Tensor | None = None  # filled by the engine for gated adapters
    id: int = field(default_factory=lambda: next(_ids))
    arrived: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()
