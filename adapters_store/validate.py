"""Checks an adapter before it is stored: name, metadata, and the weights against the base model.

Each check returns a list of ``Problem`` (field, message with its fix, error class) instead of raising, so a
caller can gather every problem of an upload and raise once with ``raise_problems``. ``validate_name`` and
``validate_adapter`` are the raising one-call forms. Problems that repeat across layers (the same shape
mismatch in all 30 ``q_proj``) are reported once, naming the first few module paths and how many more.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from .errors import AdapterError, AdapterIncompatible, AdapterInvalid, AdapterTooLarge
from .spec import BaseModelSpec
from .weights import AdapterWeights

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
RESERVED_NAMES = frozenset({"__base__", "auto"})  # compared case-insensitively
MAX_DESCRIPTION_CHARS = 2000
MAX_EXAMPLES = 1000
MAX_EXAMPLE_CHARS = 4000
_SHOW_PATHS = 3
# When several problems of one upload have different classes, the most specific answer wins.
_PRECEDENCE: tuple[type[AdapterError], ...] = (AdapterTooLarge, AdapterInvalid, AdapterIncompatible)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an upload: ``param`` is the field, ``message`` says what and how to fix it."""

    param: str
    message: str
    error: type[AdapterError] = AdapterIncompatible

    @classmethod
    def from_error(cls, e: AdapterError) -> list["Problem"]:
        return [cls(param, message, type(e)) for param, message in e.problems]


def raise_problems(problems: Sequence[Problem], subject: str) -> None:
    """Raise one error listing every problem (no-op when there are none)."""
    if not problems:
        return
    error = next(c for c in _PRECEDENCE + (AdapterError,) if any(issubclass(p.error, c) for p in problems))
    if len(problems) == 1:
        message = f"{subject}: {problems[0].message}"
    else:
        items = " ".join(f"({i}) {p.param}: {p.message};" for i, p in enumerate(problems, 1))
        message = f"{subject}: {len(problems)} problems: {items.rstrip(';')}"
    raise error(message, param=problems[0].param, problems=[(p.param, p.message) for p in problems])


def name_problems(name: object) -> list[Problem]:
    if isinstance(name, str) and name.lower() in RESERVED_NAMES:
        return [Problem("name", f"{name!r} is reserved ({sorted(RESERVED_NAMES)} mean the base model and the "
                                "router); choose another name", AdapterInvalid)]
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        return [Problem("name", f"{name!r} is not a valid adapter name: use 1-64 characters from A-Z a-z 0-9 . _ -, "
                                "starting with a letter or digit", AdapterInvalid)]
    return []


def validate_name(name: object) -> None:
    """Raise ``AdapterInvalid`` unless ``name`` matches ``NAME_PATTERN`` and is not reserved."""
    raise_problems(name_problems(name), "adapter name")


def metadata_problems(description: object, examples: object) -> list[Problem]:
    """``description``: a string up to 2000 chars; ``examples`` (router prompts): up to 1000 non-empty strings."""
    out = []
    if description is not None and not isinstance(description, str):
        out.append(Problem("description", f"must be a string, got {type(description).__name__}", AdapterInvalid))
    elif isinstance(description, str) and len(description) > MAX_DESCRIPTION_CHARS:
        out.append(Problem("description", f"is {len(description)} characters; shorten it to at most "
                                          f"{MAX_DESCRIPTION_CHARS}", AdapterInvalid))
    if examples is None:
        return out
    if isinstance(examples, str) or not isinstance(examples, (list, tuple)):
        return out + [Problem("examples", "must be a list of prompt strings", AdapterInvalid)]
    if len(examples) > MAX_EXAMPLES:
        out.append(Problem("examples", f"has {len(examples)} prompts; keep at most {MAX_EXAMPLES}", AdapterInvalid))
    for i, ex in enumerate(examples):
        if not isinstance(ex, str) or not ex.strip():
            out.append(Problem(f"examples[{i}]", "must be a non-empty string", AdapterInvalid))
        elif len(ex) > MAX_EXAMPLE_CHARS:
            out.append(Problem(f"examples[{i}]", f"is {len(ex)} characters; shorten it to at most "
                                                 f"{MAX_EXAMPLE_CHARS}", AdapterInvalid))
    return out


def size_problems(size_bytes: int, limit: int, what: str = "upload") -> list[Problem]:
    if size_bytes <= limit:
        return []
    return [Problem("file", f"the {what} is {size_bytes} bytes, over the limit of {limit} bytes; shrink the adapter "
                            "(lower rank, fewer target modules) or raise CLORA_MAX_UPLOAD_BYTES", AdapterTooLarge)]


def adapter_problems(weights: AdapterWeights, base: BaseModelSpec) -> list[Problem]:
    """Rank, module paths, target modules, shapes, and finiteness of ``weights`` against ``base``."""
    out = []
    if weights.rank > base.max_lora_rank:
        out.append(Problem("file", f"rank {weights.rank} exceeds max_lora_rank {base.max_lora_rank}: retrain with "
                                   f"r <= {base.max_lora_rank} or raise CLORA_MAX_LORA_RANK"))
    grouped: dict[str, list[str]] = {}
    for path, pair in sorted(weights.modules.items()):
        for message in _module_problems(path, pair.A, pair.B, pair.scale, base):
            grouped.setdefault(message, []).append(path)
    for message, paths in grouped.items():
        shown = ", ".join(paths[:_SHOW_PATHS])
        more = f" and {len(paths) - _SHOW_PATHS} more" if len(paths) > _SHOW_PATHS else ""
        out.append(Problem("file", f"{message} ({shown}{more})"))
    return out


def validate_adapter(weights: AdapterWeights, base: BaseModelSpec) -> None:
    """Raise ``AdapterIncompatible`` listing every way ``weights`` does not fit ``base``."""
    raise_problems(adapter_problems(weights, base), "adapter")


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN or inf in ``t``. A finite sum proves it in one cheap op; only a non-finite sum (NaN/inf, or
    finite values that overflow when added) needs the elementwise test."""
    return math.isfinite(float(t.sum())) or bool(torch.isfinite(t).all())


def _module_problems(path: str, A: torch.Tensor, B: torch.Tensor, scale: float,
                     base: BaseModelSpec) -> Iterable[str]:
    leaf = path.rsplit(".", 1)[-1]
    shape = base.module_shapes.get(path)
    if shape is None:
        yield (f"'{leaf}' at this path is not a linear layer of the base model; the adapter was made for a "
               "different base model (or with a different module prefix)")
    elif leaf not in base.target_modules:
        yield (f"target module '{leaf}' is not among the server's lora_target_modules {list(base.target_modules)}: "
               "add it to CLORA_LORA_TARGET_MODULES or retrain without it")
    else:
        in_features, out_features = shape
        if A.shape[1] != in_features:
            yield (f"{leaf}: lora_A takes {A.shape[1]} input features but the base layer takes {in_features}; "
                   "the adapter was made for a different base model")
        if B.shape[0] != out_features:
            yield (f"{leaf}: lora_B gives {B.shape[0]} output features but the base layer gives {out_features}; "
                   "the adapter was made for a different base model")
    for label, t in (("lora_A", A), ("lora_B", B)):
        if not _all_finite(t):
            yield f"{leaf}: {label} holds NaN or inf values; retrain or re-export the adapter"
    if not math.isfinite(scale):
        yield f"{leaf}: scale (lora_alpha / r) is not finite; fix lora_alpha and r in adapter_config.json"
