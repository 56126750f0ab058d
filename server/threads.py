"""Where blocking work that touches torch runs, off the event loop.

torch gives every thread that runs parallel work an OpenMP team that lives as long as the thread, and a second
live team slows the engine thread's steps (measured on 2 cores: about 1.4x per matmul, 2x per decode step with a
few pooled threads holding teams). So the model itself only runs on the engine thread (``Engine.run_on_engine``),
and the other torch work (loading the model, decoding an adapter's weights) runs in a thread of its own that ends
with the work, taking its team along: never in a pooled thread (``asyncio.to_thread``) that lives on.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Callable


async def in_own_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """Run blocking ``fn(*args)`` in a new thread that ends with it; return its result or raise its error."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if not fut.done():
            fut.set_result(value) if ok else fut.set_exception(value)

    def target() -> None:
        try:
            value, ok = fn(*args), True
        except BaseException as e:  # handed to the awaiting task
            value, ok = e, False
        try:
            loop.call_soon_threadsafe(settle, ok, value)
        except RuntimeError:  # the loop closed meanwhile (shutdown): nobody waits any more
            pass

    threading.Thread(target=target, name=f"clora-{getattr(fn, '__name__', 'work')}", daemon=True).start()
    return await fut
