"""The running server's side of sizing: the sizing job (``python -m imgcache.sizing``)
run in a child process at nice 19, for the management API and, every
``[history] predict_interval``, for the imgcache_predicted_*_hit_ratio gauges.

A child process keeps numpy and numba (``imgcache[sizing]``) out of the server, its CPU
time below serving, and its memory returned when it ends. One job runs at a time.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

from imgcache.history import AccessHistory, ServerState
from imgcache.metrics import PREDICTED_CAP_FACTORS, Metrics
from imgcache.sizing import MISSING_EXTRA

log = logging.getLogger(__name__)

#: Longest a sizing job may run before it is killed.
JOB_TIMEOUT = 600.0
#: The first gauge update waits this long after start, so start-up is not slowed.
FIRST_DELAY = 60.0


class SizingFailed(Exception):
    """The sizing job failed; the message says why (and what to install, if that is it)."""

    def __init__(self, message: str, missing_extra: bool = False) -> None:
        super().__init__(message)
        self.missing_extra = missing_extra


class Predictions:
    """Runs sizing jobs over the server's access history."""

    def __init__(self, history: AccessHistory, state: Callable[[], ServerState],
                 metrics: Metrics) -> None:
        self._history = history
        self._state = state
        self._metrics = metrics
        self._one_at_a_time = asyncio.Lock()

    async def size(self, caps: list[int] | None = None, since: float | None = None,
                   policies: bool = False) -> dict[str, Any]:
        """The sizing answer for the history as it is now (records still in memory are
        written first). Raises SizingFailed."""
        if not self._history.enabled:
            raise SizingFailed("the access history is off ([history] max_requests = 0): "
                               "there is nothing to size from")
        await self._history.flush()
        state = self._state()
        request = {"history_dir": str(self._history.directory), "caps": caps,
                   "since": since, "policies": policies, "max_bytes": state.max_bytes,
                   "pinned": dict(state.pinned)}
        async with self._one_at_a_time:
            return await self._run_job(request)

    async def _run_job(self, request: dict[str, Any]) -> dict[str, Any]:
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "imgcache.sizing", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(
                child.communicate(json.dumps(request).encode()), JOB_TIMEOUT)
        except TimeoutError:
            await _stop(child)
            raise SizingFailed(f"the sizing job ran longer than {JOB_TIMEOUT:.0f} s and was "
                               "stopped; try a shorter --since") from None
        except asyncio.CancelledError:  # the server is stopping
            await _stop(child)
            raise
        message = err.decode(errors="replace").strip()
        if child.returncode == MISSING_EXTRA:
            raise SizingFailed(message, missing_extra=True)
        if child.returncode != 0:
            last = message.splitlines()[-1] if message else "no message"
            raise SizingFailed(f"the sizing job failed (exit status {child.returncode}): "
                               f"{last}")
        return json.loads(out)

    async def update_gauges(self) -> None:
        """Recompute imgcache_predicted_{byte_,}hit_ratio over the whole history."""
        max_bytes = self._state().max_bytes
        factors = [float(f) for f in PREDICTED_CAP_FACTORS]
        answer = await self.size([int(max_bytes * f) for f in factors])
        for label, row in zip(PREDICTED_CAP_FACTORS, answer["caps"], strict=True):
            known = answer["requests"] > 0
            self._metrics.predicted_byte_hit_ratio.labels(label).set(
                row["byte_hit_ratio"] if known else float("nan"))
            self._metrics.predicted_hit_ratio.labels(label).set(
                row["hit_ratio"] if known else float("nan"))

    async def update_forever(self, interval: float) -> None:
        """Update the gauges every ``interval`` seconds, the first time after FIRST_DELAY.
        Without imgcache[sizing] installed, say so once and stop."""
        await asyncio.sleep(min(FIRST_DELAY, interval))
        while True:
            try:
                await self.update_gauges()
            except SizingFailed as exc:
                if exc.missing_extra:
                    log.warning("imgcache_predicted_*_hit_ratio stay NaN: %s", exc)
                    return
                log.warning("could not update the predicted hit ratios: %s", exc)
            await asyncio.sleep(interval)


async def _stop(child: asyncio.subprocess.Process) -> None:
    if child.returncode is None:
        child.kill()
        await child.wait()
