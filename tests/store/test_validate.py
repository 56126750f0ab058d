"""Validation: each problem is named with its fix, and a combination is ONE message listing all."""

from __future__ import annotations

import pytest

from adapters_store.errors import AdapterIncompatible, AdapterInvalid, AdapterTooLarge
from adapters_store.store import AdapterStore
from adapters_store.validate import validate_name

CASES = [  # (id, adapter kwargs, error class, message pattern)
    ("wrong_shapes", dict(wrong_in=48), AdapterIncompatible, r"lora_A takes 48 input features but the base layer takes 64"),
    ("rank_too_big", dict(r=32), AdapterIncompatible, r"rank 32 exceeds max_lora_rank 16.*CLORA_MAX_LORA_RANK"),
    ("unknown_module", dict(extra_paths=("model.layers.0.mlp.fancy_proj",)), AdapterIncompatible,
     r"'fancy_proj' at this path is not a linear layer of the base model"),
    ("nan", dict(fill=float("nan")), AdapterIncompatible, r"lora_B holds NaN or inf"),
    ("inf", dict(fill=float("inf")), AdapterIncompatible, r"lora_B holds NaN or inf"),
]


@pytest.mark.parametrize("case_id,kwargs,error,pattern", CASES, ids=[c[0] for c in CASES])
def test_each_problem_is_named(store: AdapterStore, make_adapter, case_id, kwargs, error, pattern) -> None:
    with pytest.raises(error, match=pattern):
        store.register_dir("bad", make_adapter(**kwargs))
    assert store.versions("bad") == []


def test_module_outside_server_targets(tmp_path, base_spec, make_adapter) -> None:
    from adapters_store.spec import BaseModelSpec

    narrow = BaseModelSpec(base_spec.fingerprint, base_spec.module_shapes, ("q_proj",), 16)
    store = AdapterStore(tmp_path / "s", narrow, 4 << 20)
    with pytest.raises(AdapterIncompatible, match=r"target module 'v_proj' is not among the server's "
                                                  r"lora_target_modules \['q_proj'\].*CLORA_LORA_TARGET_MODULES"):
        store.register_dir("v", make_adapter())


def test_repeated_problem_is_grouped_with_paths(store: AdapterStore, make_adapter) -> None:
    with pytest.raises(AdapterIncompatible) as e:
        store.register_dir("bad", make_adapter(wrong_in=48, targets=("q_proj",)))
    assert "model.layers.0.self_attn.q_proj" in e.value.message and len(e.value.problems) == 1


@pytest.mark.parametrize("name", ["", "-lead", ".hidden", "a b", "x" * 65, "a/b", "__base__", "auto", "AUTO", "é"])
def test_bad_names(name: str) -> None:
    with pytest.raises(AdapterInvalid) as e:
        validate_name(name)
    assert e.value.param == "name"


@pytest.mark.parametrize("name", ["a", "math-v2", "My_Adapter.3", "9" * 64])
def test_good_names(name: str) -> None:
    validate_name(name)


def test_too_big(tmp_path, base_spec, make_adapter) -> None:
    store = AdapterStore(tmp_path / "s", base_spec, max_upload_bytes=2048)
    with pytest.raises(AdapterTooLarge, match=r"over the limit of 2048 bytes.*CLORA_MAX_UPLOAD_BYTES"):
        store.register_dir("big", make_adapter())


def test_combination_gives_one_message_listing_all(store: AdapterStore, make_adapter) -> None:
    src = make_adapter(r=32, wrong_in=48, fill=float("nan"), extra_paths=("model.layers.0.mlp.fancy_proj",))
    with pytest.raises(AdapterInvalid) as e:
        store.register_dir("bad name", src, examples=["ok", ""])
    msg = e.value.message
    for needle in ("is not a valid adapter name", "examples[1]", "rank 32 exceeds", "input features",
                   "NaN or inf", "fancy_proj"):
        assert needle in msg, needle
    fields = [p for p, _ in e.value.problems]
    assert fields[0] == "name" and "examples[1]" in fields and fields.count("file") >= 4


def test_too_big_and_bad_name_together(tmp_path, base_spec, make_adapter) -> None:
    store = AdapterStore(tmp_path / "s", base_spec, max_upload_bytes=2048)
    with pytest.raises(AdapterTooLarge) as e:
        store.register_dir("__base__", make_adapter())
    assert "reserved" in e.value.message and "over the limit" in e.value.message
