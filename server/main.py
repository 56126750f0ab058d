"""The app factory: ``create_app(settings)``. Heavy state is built in the lifespan, off the event loop."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from . import __version__
from .api import admin, generate, health, openai, tgi, tokenize
from .errors import install_error_handlers
from .metrics import Metrics
from .settings import Settings
from .state import build_state
from .threads import in_own_thread

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.settings = settings
        app.state.metrics = metrics
        app.state.core = None
        app.state.load_error = None

        async def load() -> None:
            try:
                app.state.core = await in_own_thread(build_state, settings, metrics)
            except Exception as e:  # /ready reports it; the process stays up for diagnosis
                log.exception("start-up failed")
                app.state.load_error = str(e)

        task = asyncio.create_task(load())
        try:
            yield
        finally:
            task.cancel()
            core = app.state.core
            if core is not None:
                await core.cache.close()
                await asyncio.to_thread(core.close)

    app = FastAPI(title="clora-serve", version=__version__, lifespan=lifespan)
    install_error_handlers(app)
    for module in (health, openai, generate, tokenize, tgi, admin):
        app.include_router(module.router)
    return app
