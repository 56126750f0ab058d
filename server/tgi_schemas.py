"""Request bodies of TGI's and LoRAX's generation API (``/generate``, ``/generate_stream``, ``/``), validated at
the boundary like the OpenAI ones in schemas.py."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .engine.sampling import SamplingParams
from .schemas import MAX_LOGPROBS, MAX_STOP


class TGIParameters(BaseModel):
    """``parameters`` of TGI's and LoRAX's ``/generate`` (their clients send every field, mostly null)."""

    model_config = ConfigDict(extra="ignore")

    adapter_id: str | None = Field(None, description="A registered adapter's name, 'auto' to route; none: base.")
    adapter_source: str | None = None
    merged_adapters: Any = None
    api_token: str | None = None
    best_of: int | None = Field(None, ge=1, le=1, description="Only best_of=1 is supported.")
    details: bool = False
    decoder_input_details: bool = False
    do_sample: bool = False
    max_new_tokens: int | None = Field(None, ge=1)
    ignore_eos_token: bool = False
    repetition_penalty: float | None = Field(None, gt=0.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    return_full_text: bool | None = False
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOP)
    temperature: float | None = Field(None, gt=0.0, le=5.0)
    top_k: int | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    truncate: int | None = Field(None, ge=1, description="Keep only the input's last this many tokens.")
    typical_p: float | None = None
    watermark: bool = False
    response_format: Any = None
    grammar: Any = None
    top_n_tokens: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="TGI's top tokens per step.")
    return_k_alternatives: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="LoRAX's alternatives.")

    @field_validator("adapter_source", "merged_adapters", "response_format", "grammar")
    @classmethod
    def _not_supported(cls, v: Any, info: Any) -> Any:
        if v is None:
            return v
        how = ("register the adapter with POST /admin/adapters (or drop it in the adapter store) and pass its "
               "name as adapter_id" if info.field_name in ("adapter_source", "merged_adapters")
               else "plain text generation only; remove the field")
        raise ValueError(f"{info.field_name} is not supported by this server: {how}")

    @field_validator("typical_p")
    @classmethod
    def _typical_off(cls, v: float | None) -> float | None:
        if v is not None and v != 1.0:
            raise ValueError("typical_p is not supported by this server; remove the field")
        return v

    @field_validator("watermark")
    @classmethod
    def _no_watermark(cls, v: bool) -> bool:
        if v:
            raise ValueError("watermark is not supported by this server; remove the field")
        return v

    @property
    def samples(self) -> bool:
        """TGI's rule: sampling when asked, or when any warper is set."""
        return (self.do_sample or self.temperature not in (None, 1.0) or bool(self.top_k)
                or self.top_p not in (None, 1.0))

    @property
    def alternatives(self) -> int:
        return max(self.top_n_tokens or 0, self.return_k_alternatives or 0)


class TGIRequest(BaseModel):
    """TGI's and LoRAX's ``POST /generate`` (and ``/generate_stream``, and ``/`` with ``stream``)."""

    model_config = ConfigDict(extra="ignore")

    inputs: str = Field(..., min_length=1)
    parameters: TGIParameters = Field(default_factory=TGIParameters)
    stream: bool = False

    def sampling(self, max_tokens: int, stream: bool) -> SamplingParams:
        """Greedy unless TGI's rule says sample; log-probabilities of the output when the response lists tokens
        (a stream always does), of the input when ``decoder_input_details``."""
        p = self.parameters
        return SamplingParams(
            max_tokens=max_tokens, temperature=(p.temperature or 1.0) if p.samples else 0.0, top_p=p.top_p or 1.0,
            top_k=p.top_k or 0, seed=p.seed, stop=tuple(p.stop), ignore_eos=p.ignore_eos_token,
            frequency_penalty=p.frequency_penalty or 0.0, repetition_penalty=p.repetition_penalty or 1.0,
            logprobs=p.alternatives if stream or p.details else None,
            prompt_logprobs=0 if p.decoder_input_details else None)
