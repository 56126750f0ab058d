"""From a routed request to engine events: tokenize, check the context, submit, relay events to asyncio."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Callable

from router.base import BASE_ADAPTER, Decision

from .engine.engine import Engine
from .engine.requests import Done, Event, Failed, GenerationRequest
from .engine.sampling import SamplingParams, TokenLogprob
from .errors import GenerationFailed, PromptTooLong, UnknownTokenIds
from .threads import in_own_thread


@dataclass
class Result:
    """A whole (non-streamed) generation."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    timings: dict[str, float] = field(default_factory=dict)
    logprobs: tuple[TokenLogprob, ...] = ()
    prompt_logprobs: tuple[TokenLogprob, ...] = ()
    stop_reason: str | int | None = None
    end: TokenLogprob | None = None  # the end token (EOS or a stop token id) and its logprob, when asked

    @classmethod
    def of(cls, done: Done) -> Result:
        return cls(done.text, done.finish_reason, done.prompt_tokens, done.completion_tokens, done.timings,
                   done.logprobs, done.prompt_logprobs, done.stop_reason, done.end)


class Generator:
    """Thin asyncio front of the engine thread. One per app."""

    def __init__(self, engine: Engine, tokenizer: object, max_len: int, vocab_size: int,
                 prefetch: Callable[[tuple[str, int]], None] | None = None,
                 is_warm: Callable[[tuple[str, int]], bool] = lambda key: False) -> None:
        self.engine, self.tokenizer, self.max_len, self.vocab_size = engine, tokenizer, max_len, vocab_size
        self.prefetch = prefetch  # loads an adapter into the CPU tier off the engine thread
        self.is_warm = is_warm  # already in the CPU tier: nothing to prefetch

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def prompt_ids(self, prompt: str | list[int]) -> list[int]:
        """A completion prompt's ids: text is tokenized, token ids (OpenAI allows them) are checked."""
        if isinstance(prompt, str):
            return self.encode(prompt)
        self.known(prompt, "prompt")
        return list(prompt)

    def checked(self, params: SamplingParams) -> SamplingParams:
        """``params``, once the token ids they name (``logit_bias``, ``stop_token_ids``) are in the vocabulary."""
        self.known([t for t, _ in params.logit_bias], "logit_bias")
        self.known(params.stop_token_ids, "stop_token_ids")
        return params

    def known(self, ids: Sequence[int], field: str) -> None:
        """``UnknownTokenIds`` (naming ``field``) unless every id is in the vocabulary."""
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise UnknownTokenIds(f"{field}: token ids must be in [0, {self.vocab_size}); got {bad[:5]}", param=field)

    def prompt_text(self, prompt: str | list[int]) -> str:
        return prompt if isinstance(prompt, str) else self.tokenizer.decode(prompt)

    def chat_prompt(self, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                    continue_final: bool = False) -> str:
        """The messages in the model's chat template (a plain ``role: content`` transcript when it has none),
        ending with the assistant's turn unless ``add_generation_prompt`` is false, or with the last message left
        open (``continue_final``: the model continues it; no new turn then)."""
        add_generation_prompt = add_generation_prompt and not continue_final
        if not getattr(self.tokenizer, "chat_template", None):
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
            return text[:-1] if continue_final else text + ("assistant: " if add_generation_prompt else "")
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=continue_final, tokenize=False)

    def encode_chat(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])

    def budget(self, n_prompt: int, max_tokens: int | None, default: int) -> int:
        """The number of new tokens to allow; 400 when the prompt leaves no room or max_tokens overflows."""
        room = self.max_len - n_prompt
        if max_tokens is None:
            if room < 1:
                raise PromptTooLong(
                    f"prompt has {n_prompt} tokens but the context length is {self.max_len}; shorten the prompt",
                    param="prompt",
                )
            return min(default, room)
        if n_prompt + max_tokens > self.max_len:
            raise PromptTooLong(
                f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) = {n_prompt + max_tokens} exceeds the "
                f"context length of {self.max_len} tokens; shorten the prompt or lower max_tokens",
                param="max_tokens" if n_prompt < self.max_len else "prompt",
            )
        return max_tokens

    async def stream(self, ids: list[int], decision: Decision, params: SamplingParams,
                     deltas: bool = True) -> AsyncIterator[Event]:
        """Yield Delta events (none when ``deltas`` is false) then one Done, which carries the whole text;
        cancelling the consumer frees the engine row."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[Event] = asyncio.Queue()

        def emit(ev: Event) -> None:
            loop.call_soon_threadsafe(q.put_nowait, ev)

        adapter = None if decision.adapter == BASE_ADAPTER else (decision.adapter, int(decision.version or 0))
        if adapter is not None and self.prefetch is not None and not self.is_warm(adapter):
            await in_own_thread(self.prefetch, adapter)  # decodes tensors: see server/threads.py
        req = GenerationRequest(prompt_ids=ids, params=params, emit=emit, adapter=adapter, deltas=deltas)
        self.engine.submit(req)
        try:
            while True:
                ev = await q.get()
                if isinstance(ev, Failed):
                    raise GenerationFailed(ev.message)
                yield ev
                if isinstance(ev, Done):
                    return
        finally:
            req.cancel()  # no-op when finished; frees the row when the client went away
