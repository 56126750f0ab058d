"""Admin endpoints (bearer token): register, list, inspect, delete, pin adapters; vLLM-compatible aliases."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
