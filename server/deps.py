"""Typed dependencies: what a route handler may take from the app."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from .errors import NotReady
from .metrics import Metrics
from .settings import Settings
from .state import AppState


def get_core(request: Request) -> AppState:
    core = request.app.state.core
    if core is None:
        err = request.app.state.load_error
        raise NotReady(f"model failed to load: {err}" if err else "model is loading; retry shortly")
    return core


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


Core = Annotated[AppState, Depends(get_core)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
