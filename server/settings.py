"""The one settings object. Only this module reads the environment (prefix ``CLORA_``).

Built once (``Settings()`` or ``Settings(**overrides)`` in tests) and passed down as typed sub-configs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from base_model.loader import DEFAULT_CACHE_DIR
from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class ModelConfig(BaseModel):
    """What base model to load and how."""

    base_model: str | None
    model_cache_dir: Path
    dtype: str
    device: str
    num_threads: int | None
    max_model_len: int | None
    served_model_name: str | None


class EngineConfig(BaseModel):
    """Batching, slots and queue limits of the engine loop."""

    max_batch_size: int
    max_loras: int
    max_cpu_loras: int
    max_lora_rank: int
    max_queue: int
    target_modules: tuple[str, ...]
    prefill_chunk: int
    pack_weights: bool
    kernel_dir: Path | None  # where the compiled LoRA CPU kernel is built (lora_kernel.py); None: not used


class RouterConfig(BaseModel):
    """Which router answers ``model: "auto"`` and what happens below the confidence floor."""

    kind: str
    min_confidence: float
    on_low_confidence: Literal["fallback", "reject"]


class CacheConfig(BaseModel):
    """Response cache: Redis when a URL is given, else an in-process LRU."""

    enabled: bool
    redis_url: str | None
    ttl_s: int
    max_entry_bytes: int
    max_entries: int
    redis_timeout_s: float


class Settings(BaseSettings):
    """Every knob of clora-serve. Environment variables are ``CLORA_<FIELD>`` (case-insensitive)."""

    model_config = SettingsConfigDict(env_prefix="CLORA_", extra="ignore", case_sensitive=False)

    host: str = Field("127.0.0.1", description="Interface to bind.")
    port: int = Field(8000, ge=1, le=65535, description="TCP port to bind.")
    base_model: str | None = Field(
        None, description="Local HF model directory; empty means the embedded SmolLM2-135M-Instruct."
    )
    served_model_name: str | None = Field(None, description="Model id shown in /v1/models (default: dir name).")
    model_cache_dir: Path = Field(
        DEFAULT_CACHE_DIR, description="Where the GGUF is converted to safetensors once."
    )
    dtype: str = Field("auto", description="float32 | bfloat16 | float16 | auto (bf16 on CUDA or AMX/AVX512-BF16 CPUs).")
    device: str = Field("auto", description="cpu | cuda | cuda:N | auto (CUDA when present).")
    num_threads: int | None = Field(None, ge=1, description="torch intra-op threads (default: torch's choice).")
    max_model_len: int | None = Field(2048, ge=16, description="Context cap (prompt + new tokens); None = model max.")
    adapters_dir: Path = Field(Path("adapters"), description="Local adapter store directory.")
    max_batch_size: int = Field(16, ge=1, le=512, description="Rows decoded together.")
    max_loras: int = Field(8, ge=1, le=256, description=(
        "Compute slots for adapters (GPU/engine tier), each of CLORA_MAX_LORA_RANK; adapters of smaller rank share "
        "them by rank (8 slots of rank 64 hold 32 adapters of rank 16)."))
    max_cpu_loras: int = Field(64, ge=1, description="Adapters kept decoded in host memory (CPU tier).")
    max_lora_rank: int = Field(64, ge=1, le=1024, description="Largest rank a slot holds.")
    max_queue: int = Field(256, ge=1, description="Waiting requests before 503 + Retry-After.")
    prefill_chunk: int = Field(16, ge=1, description="New rows prefilled together in one engine step.")
    pack_weights: bool = Field(True, description="Pre-pack bf16 base weights for oneDNN on CPU (checked per layer).")
    lora_kernel: bool = Field(True, description=(
        "Compute the bf16 LoRA term of decode steps with a small C kernel on CPU (built once with the system C "
        "compiler into CLORA_MODEL_CACHE_DIR/kernels; without a compiler the oneDNN term serves)."))
    lora_target_modules: tuple[str, ...] = Field(
        DEFAULT_TARGET_MODULES, description="Linear layers that can carry adapters."
    )
    admin_token: SecretStr | None = Field(None, description="Bearer token for /admin; unset disables admin.")
    max_upload_bytes: int = Field(512 * 1024 * 1024, ge=1024, description="Largest adapter upload (413 above).")
    store_spare_files: int = Field(
        2, ge=0, le=16, description="Pre-written files that registered weights overwrite (faster hot registration; 0: none).")
    router: str = Field("cascade", description="Router kind for model=auto: hint | tfidf | cascade | embedding | base-hidden | gates.")
    router_min_confidence: float = Field(0.5, ge=0.0, le=1.0)
    router_on_low_confidence: Literal["fallback", "reject"] = "fallback"
    cache_enabled: bool = True
    redis_url: str | None = Field(None, description="redis://host:port/db; unset = in-process LRU cache.")
    cache_ttl_s: int = Field(3600, ge=1)
    cache_max_entry_bytes: int = Field(1_000_000, ge=1)
    cache_max_entries: int = Field(4096, ge=1)
    redis_timeout_s: float = Field(0.05, gt=0)
    log_level: str = "info"

    @field_validator("dtype")
    @classmethod
    def _dtype_known(cls, v: str) -> str:
        allowed = {"auto", "float32", "bfloat16", "float16"}
        if v not in allowed:
            raise ValueError(f"CLORA_DTYPE must be one of {sorted(allowed)}, got {v!r}")
        return v

    @field_validator("base_model", "redis_url", "admin_token", mode="before")
    @classmethod
    def _empty_is_none(cls, v: object) -> object:
        return None if v == "" else v

    @field_validator("lora_target_modules", mode="before")
    @classmethod
    def _split_modules(cls, v: object) -> object:
        if isinstance(v, str):
            return tuple(s.strip() for s in v.split(",") if s.strip())
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "Settings":
        if self.max_cpu_loras < self.max_loras:
            raise ValueError(
                f"CLORA_MAX_CPU_LORAS ({self.max_cpu_loras}) must be >= CLORA_MAX_LORAS ({self.max_loras})"
            )
        if self.admin_token is not None and len(self.admin_token.get_secret_value()) < 8:
            raise ValueError("CLORA_ADMIN_TOKEN must be at least 8 characters (or unset to disable admin)")
        return self

    # Typed sub-configs handed to the parts that need them.
    @property
    def model(self) -> ModelConfig:
        return ModelConfig(
            base_model=self.base_model, model_cache_dir=self.model_cache_dir, dtype=self.dtype,
            device=self.device, num_threads=self.num_threads, max_model_len=self.max_model_len,
            served_model_name=self.served_model_name,
        )

    @property
    def engine(self) -> EngineConfig:
        return EngineConfig(
            max_batch_size=self.max_batch_size, max_loras=self.max_loras, max_cpu_loras=self.max_cpu_loras,
            max_lora_rank=self.max_lora_rank, max_queue=self.max_queue, target_modules=self.lora_target_modules,
            prefill_chunk=self.prefill_chunk, pack_weights=self.pack_weights,
            kernel_dir=self.model_cache_dir / "kernels" if self.lora_kernel and self.pack_weights else None,
        )

    @property
    def routing(self) -> RouterConfig:
        return RouterConfig(
            kind=self.router, min_confidence=self.router_min_confidence,
            on_low_confidence=self.router_on_low_confidence,
        )

    @property
    def cache(self) -> CacheConfig:
        return CacheConfig(
            enabled=self.cache_enabled, redis_url=self.redis_url, ttl_s=self.cache_ttl_s,
            max_entry_bytes=self.cache_max_entry_bytes, max_entries=self.cache_max_entries,
            redis_timeout_s=self.redis_timeout_s,
        )
