"""Helpers of the HTTP API tests: requests as a user sends them, and the SSE stream read back."""

from __future__ import annotations

import json

import httpx

PROMPTS = ["The weather today is", "Once upon a time", "In the beginning the", "A list of fruits:",
           "def add(a, b):", "Dear team, please", "Breaking news from", "The answer is"]


def post(srv, path: str, body: dict, timeout: float = 60) -> httpx.Response:
    return httpx.post(srv.url + path, json=body, timeout=timeout)


def complete(srv, model: str, prompt: str, **kw) -> dict:
    r = post(srv, "/v1/completions", {"model": model, "prompt": prompt, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def stream_text(srv, path: str, body: dict) -> tuple[str, list[dict]]:
    chunks = []
    with httpx.stream("POST", srv.url + path, json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    for ln in lines[:-1]:
        chunks.append(json.loads(ln[6:]))
    text = "".join(c["choices"][0].get("text", "") or c["choices"][0].get("delta", {}).get("content", "") or ""
                   for c in chunks if c.get("choices"))
    return text, chunks
