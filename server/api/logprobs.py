"""Output-token log-probabilities in the two shapes OpenAI's API uses: the legacy completions object and chat's
``content`` list. Token strings are each token decoded on its own (special tokens included)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..engine.sampling import TokenLogprob


class LogprobFormatter:
    """Formats a request's logprobs piece by piece; completions' ``text_offset`` runs on across pieces."""

    def __init__(self, tokenizer: Any, chat: bool) -> None:
        self.tokenizer, self.chat, self.offset = tokenizer, chat, 0  # offsets count from the completion's start

    def _text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def __call__(self, lps: Sequence[TokenLogprob]) -> dict[str, Any]:
        if self.chat:
            return {"content": [{**self._entry(t.token, t.logprob),
                                 "top_logprobs": [self._entry(i, lp) for i, lp in t.top]} for t in lps]}
        return self._completion([t.token for t in lps], list(lps))

    def prompt(self, ids: Sequence[int], scored: Sequence[TokenLogprob], k: int) -> dict[str, Any]:
        """Completions' entries for the prompt (``echo``), ``k`` alternatives each: its first token has no
        log-probability."""
        return self._completion(list(ids), [None, *scored], k)

    def _completion(self, ids: list[int], lps: list[TokenLogprob | None], k: int | None = None) -> dict[str, Any]:
        tokens = [self._text(t) for t in ids]
        offsets = []
        for s in tokens:
            offsets.append(self.offset)
            self.offset += len(s)
        return {"tokens": tokens, "token_logprobs": [None if t is None else t.logprob for t in lps],
                "top_logprobs": [None if t is None else {self._text(i): lp for i, lp in t.top[:k]} for t in lps],
                "text_offset": offsets}

    def _entry(self, token: int, logprob: float) -> dict[str, Any]:
        s = self._text(token)
        return {"token": s, "logprob": logprob, "bytes": list(s.encode("utf-8"))}


def vllm_prompt_logprobs(tokenizer: Any, scored: Sequence[TokenLogprob], k: int) -> list[dict[str, Any] | None]:
    """vLLM's ``prompt_logprobs``: per prompt position, the token there and the ``k`` likeliest, each with its
    log-probability, rank and text, keyed by token id; None for the first position (nothing precedes it)."""
    out: list[dict[str, Any] | None] = [None]
    for t in scored:
        entry = {str(t.token): {"logprob": t.logprob, "rank": t.rank, "decoded_token": tokenizer.decode([t.token])}}
        for rank, (i, lp) in enumerate(t.top[:k], 1):
            entry.setdefault(str(i), {"logprob": lp, "rank": rank, "decoded_token": tokenizer.decode([i])})
        out.append(entry)
    return out

