"""Request bodies of the HTTP API, validated at the boundary (pydantic; bad fields answer 422)."""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .engine.sampling import SamplingParams

MAX_STOP = 8
MAX_CHOICES = 16  # n per request
MAX_PROMPTS = 64  # prompts per completions request (and prompts x n <= 4 x MAX_CHOICES)
MAX_LOGPROBS = 20  # top alternatives per token (OpenAI's limit for chat; vLLM's default max_logprobs)
MAX_STOP_IDS = 64
MAX_LOGIT_BIAS = 1024  # entries in logit_bias

log = logging.getLogger(__name__)
_reported_extras: set[str] = set()  # unknown request fields already logged


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    max_tokens: int | None = Field(None, ge=1, description="New tokens at most.")
    temperature: float = Field(1.0, ge=0.0, le=5.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 or -1 disables top-k.")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    ignore_eos: bool = False
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="Subtracted once from each token the output has.")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="Subtracted per occurrence in the output.")
    repetition_penalty: float = Field(1.0, gt=0.0,
                                      description="Divides logits of tokens in the prompt or output (1: off).")
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="Keep tokens at least this fraction as likely as the "
                                                           "likeliest (vLLM's; 0: off).")
    min_tokens: int = Field(0, ge=0, description="Tokens generated before EOS, stop_token_ids or stop strings may "
                                                 "end the output (vLLM's).")
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP_IDS,
                                             description="Token ids that end the output like EOS (vLLM's).")
    include_stop_str_in_output: bool = Field(False, description="Keep the stop string that ended the text.")
    logit_bias: dict[int, float] | None = Field(None, max_length=MAX_LOGIT_BIAS,
                                                description="Token id -> bias in [-100, 100] added to its logit.")

    @field_validator("top_k", mode="before")
    @classmethod
    def _minus_one_is_off(cls, v: Any) -> Any:
        return 0 if v == -1 else v

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, v: dict[int, float] | None) -> dict[int, float] | None:
        bad = {t: b for t, b in (v or {}).items() if not -100.0 <= b <= 100.0 or t < 0}
        if bad:
            raise ValueError(f"biases must be in [-100, 100] and keys token ids >= 0; got {dict(list(bad.items())[:5])}")
        return v

    @field_validator("min_tokens")
    @classmethod
    def _min_tokens_fit(cls, v: int, info: Any) -> int:
        most = info.data.get("max_tokens")
        if most is not None and v > most:
            raise ValueError(f"min_tokens ({v}) must not exceed max_tokens ({most})")
        return v

    def sampling(self, max_tokens: int) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            seed=self.seed, stop=tuple(self.stop or ()), ignore_eos=self.ignore_eos,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty, logprobs=self.logprob_count(),
            prompt_logprobs=self.prompt_logprob_count(), min_p=self.min_p, min_tokens=self.min_tokens,
            stop_token_ids=tuple(self.stop_token_ids or ()), include_stop_str_in_output=self.include_stop_str_in_output,
            logit_bias=tuple(sorted((self.logit_bias or {}).items())),
        )

    def logprob_count(self) -> int | None:
        """How many top alternatives to report with each output token's log-probability; None: no logprobs."""
        return None

    def prompt_logprob_count(self) -> int | None:
        """The same for the prompt's tokens (completions' ``echo``)."""
        return None

    def cache_fields(self) -> dict[str, Any]:
        return self.sampling(1).cache_fields()


class StreamOptions(BaseModel):
    include_usage: bool = False


_UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "response_format", "guided_json",
                "guided_regex", "guided_choice", "guided_grammar", "structured_outputs", "use_beam_search")
_OFF = (None, False, [], "none", {"type": "text"})  # values of those fields that ask for nothing


class _OpenAIRequest(_Sampling):
    model: str = Field(..., min_length=1, description="An adapter name, the base model id, or 'auto'.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="Choices to generate (seeded: choice i uses seed + i).")
    task: str | None = Field(None, description="Task hint (clora extension): route to this adapter.")
    user: str | None = None
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description=(
        "vLLM's: each prompt token's log-probability and rank, with this many likeliest alternatives."))
    # OpenAI and vLLM fields this server does not implement. They change what a response means (tool calls, a
    # JSON schema, beam search), so a request that asks for them gets a 422 naming them, not an answer that
    # silently ignores them. Fields nobody defines are ignored and logged, as vLLM does.
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    structured_outputs: Any = None
    use_beam_search: Any = None

    @field_validator(*_UNSUPPORTED)
    @classmethod
    def _not_supported(cls, v: Any, info: Any) -> Any:
        if v in _OFF or (info.field_name == "tool_choice" and v == "auto"):
            return v
        raise ValueError(f"{info.field_name} is not supported by this server (plain text generation only); "
                         "remove the field")

    @model_validator(mode="after")
    def _prompt_scores_not_streamed(self) -> Any:
        if self.stream and self.prompt_logprob_count() is not None:
            raise ValueError("the prompt's log-probabilities (prompt_logprobs, or echo with logprobs) are not "
                             "streamed; set stream=false")
        return self

    @model_validator(mode="before")
    @classmethod
    def _log_unknown(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = sorted(set(data) - set(cls.model_fields) - _reported_extras)
            if unknown:
                _reported_extras.update(unknown)
                log.warning("ignoring request fields this server does not know: %s (logged once each)", unknown)
        return data


class CompletionRequest(_OpenAIRequest):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        ..., description="Text or token ids, or a list of either: each prompt gets n choices (a list once parsed).")
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                 description="Each output token's log-probability and this many top alternatives.")
    best_of: int | None = Field(None, ge=1, le=1, description="Only best_of=1 is supported.")
    suffix: str | None = Field(None, max_length=0, description="Not supported.")

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v: str | list[str] | list[int] | list[list[int]]) -> list[str] | list[list[int]]:
        """Every form OpenAI allows, as a list of prompts: a string or a list of ids is one."""
        prompts = [v] if isinstance(v, str) or (v and isinstance(v[0], int)) else v
        if not prompts:
            raise ValueError("send at least one prompt")
        if len(prompts) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request; got {len(prompts)}")
        if any(isinstance(x, list) and not x for x in prompts):
            raise ValueError("a prompt of token ids needs at least one id")
        return prompts

    @model_validator(mode="after")
    def _rows_fit(self) -> CompletionRequest:
        if len(self.prompt) * self.n > MAX_CHOICES * 4:
            raise ValueError(f"prompts x n = {len(self.prompt)} x {self.n} is over the {MAX_CHOICES * 4} choices a "
                             "request may ask for; split the request")
        return self

    def logprob_count(self) -> int | None:
        return self.logprobs

    def prompt_logprob_count(self) -> int | None:
        asked = [k for k in (self.logprobs if self.echo else None, self.prompt_logprobs) if k is not None]
        return max(asked) if asked else None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = []
        for p in self.content:
            if p.get("type") != "text":
                raise ValueError(f"only text content parts are supported, got {p.get('type')!r}")
            parts.append(str(p.get("text", "")))
        return "".join(parts)


def chat_messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """Messages as chat templates take them (OpenAI's ``developer`` role is a system message)."""
    return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]


class ChatCompletionRequest(_OpenAIRequest):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = Field(False, description="Return each output token's log-probability.")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                     description="Alternatives per token (needs logprobs).")
    add_generation_prompt: bool = Field(True, description="vLLM's: end the prompt with a new assistant turn.")
    continue_final_message: bool = Field(False, description=(
        "vLLM's: leave the last (assistant) message open and continue it (a prefilled reply)."))

    @model_validator(mode="after")
    def _checks(self) -> "ChatCompletionRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        if self.continue_final_message and (self.add_generation_prompt or self.messages[-1].role != "assistant"):
            raise ValueError("continue_final_message continues a last assistant message; set "
                             "add_generation_prompt=false and end the messages with the assistant's start")
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        for m in self.messages:
            m.text()
        return self


    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def prompt_logprob_count(self) -> int | None:
        return self.prompt_logprobs


class GenerateRequest(_Sampling):
    """clora's own endpoint: explicit ``adapter`` or ``task`` hint, else the router decides."""

    prompt: str = Field(..., description="Raw prompt text (no chat template applied).")
    task: str | None = None
    adapter: str | None = None
    stream: bool = False
    max_tokens: int | None = Field(64, ge=1)


class TokenizeRequest(BaseModel):
    """vLLM's ``/tokenize``: a prompt, or chat messages rendered with the model's template."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, description="An adapter name, the base model id or 'auto' (one tokenizer).")
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = Field(True, description="With a prompt: the tokenizer's BOS and the like.")
    add_generation_prompt: bool = Field(True, description="With messages: end with the assistant's turn.")
    continue_final_message: bool = Field(False, description="With messages: leave the last one open.")
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send either prompt or messages")
        return self


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[int]
