"""Manifest round trip and schema errors; BaseModelSpec from a model."""

from __future__ import annotations

import json

import pytest

from adapters_store.errors import AdapterInvalid
from adapters_store.spec import BaseModelSpec, Manifest


def _manifest() -> Manifest:
    return Manifest(name="math", version=3, kind="peft_lora", base_fingerprint="abcd" * 4, rank=8, alpha=16.0,
                    target_modules=("q_proj", "v_proj"), sha256="0" * 64, size_bytes=1234,
                    created_at="2026-11-23T10:00:00+00:00", description="sums", examples=("2+2?", "7*6?"),
                    files={"adapter_model.safetensors": "1" * 64}, origin="adopt")


def test_manifest_round_trip() -> None:
    m = _manifest()
    assert Manifest.from_json(m.to_json()) == m
    assert m.key == "math@3"
    assert json.loads(m.to_json())["format"] == 1


def test_manifest_errors_name_every_field() -> None:
    d = json.loads(_manifest().to_json())
    del d["sha256"], d["kind"]
    d["version"] = 0
    d["examples"] = [1]
    with pytest.raises(AdapterInvalid) as e:
        Manifest.from_dict(d)
    for field in ("sha256: missing", "kind: missing", "version: must be", "examples: must be"):
        assert field in e.value.message


def test_manifest_not_json() -> None:
    with pytest.raises(AdapterInvalid, match="not JSON"):
        Manifest.from_json("{nope")


def test_spec_from_model(tiny_model, base_spec: BaseModelSpec) -> None:
    assert base_spec.module_shapes["model.layers.0.self_attn.q_proj"] == (64, 64)
    assert base_spec.module_shapes["model.layers.1.self_attn.v_proj"] == (64, 32)  # GQA: 2 kv heads of 16
    assert base_spec.module_shapes["model.layers.0.mlp.down_proj"] == (128, 64)
    again = BaseModelSpec.from_model(tiny_model, ("q_proj",), 8)
    assert again.fingerprint == base_spec.fingerprint and len(again.fingerprint) == 16
    import torch
    other = torch.nn.Sequential(torch.nn.Linear(64, 64))
    assert BaseModelSpec.from_model(other, ("0",), 8).fingerprint != base_spec.fingerprint
