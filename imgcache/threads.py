"""Running a blocking step on a worker thread so that a cancelled caller never outruns it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import TypeVar

T = TypeVar("T")


async def run_to_completion(pool: Executor, func: Callable[..., T], *args: object) -> T:
    """Run ``func(*args)`` on ``pool``. If the caller is cancelled meanwhile (a shutdown),
    it still waits for the thread to finish before the cancellation goes on: the thread may
    be using fds the caller closes as soon as it returns."""
    future: Awaitable[T] = asyncio.get_running_loop().run_in_executor(pool, func, *args)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            await future
        raise
