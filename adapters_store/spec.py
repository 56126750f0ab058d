"""What an adapter version is (``Manifest``) and what it must fit (``BaseModelSpec``).

A manifest is written as ``manifest.json`` next to each stored version; ``to_json``/``from_json`` round-trip it
exactly, and ``from_json`` names every missing or mistyped field at once. The base-model spec is the set of
facts validation checks an adapter against: the linear layers of the base model and their shapes, the server's
``lora_target_modules`` and ``max_lora_rank``, and a fingerprint of config + shapes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from .errors import AdapterInvalid

MANIFEST_FORMAT = 1
ORIGINS = ("register", "adopt")  # registered through the API/CLI, or adopted from a plain dir at start-up
_ARCH_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "vocab_size", "head_dim")


def utc_now() -> str:
    """ISO-8601 UTC timestamp with seconds precision, as stored in ``created_at``."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


@dataclass(frozen=True)
class Manifest:
    """One immutable adapter version.

    ``sha256`` is the digest of the weights (the ``.safetensors`` files' bytes, in sorted path order; for the
    usual single file it equals ``sha256sum adapter_model.safetensors``); ``files`` maps every stored file
    (relative path) to its own digest, checked on every load. ``key`` (``name@version``) is what caches and
    metrics use.
    """

    name: str
    version: int
    kind: str
    base_fingerprint: str
    rank: int
    alpha: float | None
    target_modules: tuple[str, ...]
    sha256: str
    size_bytes: int
    created_at: str
    description: str | None = None
    examples: tuple[str, ...] = ()
    files: Mapping[str, str] = field(default_factory=dict)
    origin: str = "register"

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        d["examples"] = list(self.examples)
        d["files"] = dict(self.files)
        d["format"] = MANIFEST_FORMAT
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Manifest":
        problems = [f"{k}: {msg}" for k, msg in _field_problems(d)]
        if problems:
            raise AdapterInvalid("manifest.json is malformed: " + "; ".join(problems), param="manifest")
        alpha = d.get("alpha")
        return cls(
            name=d["name"], version=d["version"], kind=d["kind"], base_fingerprint=d["base_fingerprint"],
            rank=d["rank"], alpha=None if alpha is None else float(alpha),
            target_modules=tuple(d["target_modules"]), sha256=d["sha256"], size_bytes=d["size_bytes"],
            created_at=d["created_at"], description=d.get("description"),
            examples=tuple(d.get("examples", ())), files=dict(d.get("files", {})),
            origin=d.get("origin", "register"),
        )

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        try:
            d = json.loads(text)
        except ValueError as e:
            raise AdapterInvalid(f"manifest.json is not JSON: {e}", param="manifest") from e
        if not isinstance(d, dict):
            raise AdapterInvalid("manifest.json must hold a JSON object", param="manifest")
        return cls.from_dict(d)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_str_list(v: object) -> bool:
    return isinstance(v, list) and all(isinstance(s, str) for s in v)


_FIELDS: dict[str, tuple[bool, Any, str]] = {  # field -> (required, check, expected)
    "name": (True, lambda v: isinstance(v, str), "a string"),
    "version": (True, lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "kind": (True, lambda v: isinstance(v, str), "a string"),
    "base_fingerprint": (True, lambda v: isinstance(v, str), "a string"),
    "rank": (True, lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "alpha": (False, lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)),
              "a number or null"),
    "target_modules": (True, _is_str_list, "a list of strings"),
    "sha256": (True, lambda v: isinstance(v, str) and len(v) == 64, "a 64-character hex digest"),
    "size_bytes": (True, lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "created_at": (True, lambda v: isinstance(v, str), "an ISO-8601 string"),
    "description": (False, lambda v: v is None or isinstance(v, str), "a string or null"),
    "examples": (False, _is_str_list, "a list of strings"),
    "files": (False, lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()),
              "an object of path -> sha256"),
    "origin": (False, lambda v: v in ORIGINS, f"one of {list(ORIGINS)}"),
    "format": (False, lambda v: v == MANIFEST_FORMAT, f"{MANIFEST_FORMAT} (written by this version)"),
}


def _field_problems(d: Mapping[str, Any]) -> list[tuple[str, str]]:
    out = []
    for key, (required, check, expected) in _FIELDS.items():
        if key not in d:
            if required:
                out.append((key, "missing"))
        elif not check(d[key]):
            out.append((key, f"must be {expected}, got {d[key]!r}"))
    return out


@dataclass(frozen=True)
class BaseModelSpec:
    """The base model as validation sees it.

    ``module_shapes`` maps each linear layer's path (``model.layers.0.self_attn.q_proj``) to
    ``(in_features, out_features)``; ``target_modules`` are the layer names the server can put adapters on
    (``lora_target_modules``); ``fingerprint`` hashes the architecture config and those shapes, so an adapter
    stored for one base model is recognised as foreign to another.
    """

    fingerprint: str
    module_shapes: Mapping[str, tuple[int, int]]
    target_modules: tuple[str, ...]
    max_lora_rank: int

    @classmethod
    def from_model(cls, model: Any, target_modules: Iterable[str], max_lora_rank: int) -> "BaseModelSpec":
        """Walk ``model``'s ``nn.Linear`` modules (a Hugging Face causal LM or any ``nn.Module``)."""
        import torch

        shapes = {name: (int(m.in_features), int(m.out_features))
                  for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        config = getattr(model, "config", None)
        arch = {k: getattr(config, k, None) for k in _ARCH_KEYS}
        return cls(fingerprint=spec_fingerprint(arch, shapes), module_shapes=shapes,
                   target_modules=tuple(target_modules), max_lora_rank=int(max_lora_rank))


def spec_fingerprint(arch: Mapping[str, Any], shapes: Mapping[str, tuple[int, int]]) -> str:
    """16 hex digits of sha256 over the architecture keys and every linear layer's shape."""
    desc = {"config": dict(arch), "shapes": {k: list(v) for k, v in sorted(shapes.items())}}
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]
