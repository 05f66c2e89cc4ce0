"""Prefetch: operators fill the cache before a boot storm (``imgcache prefetch``/``pin``).

Jobs queue up and run with bounded concurrency. Each is authorized by Glance with the
operator's token like any request, then joins or starts the image's fill, exactly as a
client download would (so a prefetch and a boot of the same image share one download).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field

from imgcache.authorize import Authorizer, Denied
from imgcache.errors import ImgcacheError, NoSpace
from imgcache.fill import Bypass, Cached, Fill, FillRegistry
from imgcache.metrics import Metrics
from imgcache.store import Store

log = logging.getLogger(__name__)

_job_ids = itertools.count(1)
#: Finished jobs kept for ``imgcache queue``.
_KEEP_FINISHED = 100


@dataclass
class PrefetchJob:
    """One image to bring into the cache (and pin, if asked)."""

    image_id: str
    token: str = field(repr=False)
    job_id: int = field(default_factory=lambda: next(_job_ids))
    pin: bool = False
    state: str = "queued"  # queued, running, cached, failed, withdrawn
    error: str = ""
    size: int = 0
    queued_at: float = field(default_factory=time.time)
    fill: Fill | None = field(default=None, repr=False)

    def describe(self) -> dict[str, object]:
        """The job as ``imgcache queue`` shows it (never the token)."""
        return {
            "job_id": self.job_id, "image_id": self.image_id, "state": self.state, "pin": self.pin,
            "size": self.size, "written": self.fill.written if self.fill else 0,
            "error": self.error, "queued_at": self.queued_at,
        }


class Prefetcher:
    """A queue of prefetch jobs worked by ``concurrency`` workers."""

    def __init__(self, authorizer: Authorizer, store: Store, fills: FillRegistry,
                 metrics: Metrics, concurrency: int) -> None:
        self._authorizer = authorizer
        self._store = store
        self._fills = fills
        self._metrics = metrics
        self._queue: asyncio.Queue[PrefetchJob] = asyncio.Queue()
        self._active: list[PrefetchJob] = []
        self._finished: deque[PrefetchJob] = deque(maxlen=_KEEP_FINISHED)
        self._workers = [asyncio.get_running_loop().create_task(self._work())
                         for _ in range(concurrency)]

    def submit(self, image_ids: list[str], token: str, pin: bool = False) -> list[PrefetchJob]:
        """Queue images (ids already validated)."""
        jobs = [PrefetchJob(image_id, token, pin=pin) for image_id in image_ids]
        for job in jobs:
            self._active.append(job)
            self._queue.put_nowait(job)
        return jobs

    def jobs(self) -> list[PrefetchJob]:
        """Queued and running jobs, then recently finished ones."""
        return [*self._active, *self._finished]

    def pending_ids(self) -> list[str]:
        """Ids of images with a queued or running job, each once, oldest first."""
        return list(dict.fromkeys(job.image_id for job in self._active
                                  if job.state != "withdrawn"))

    def withdraw(self, image_id: str | None = None) -> int:
        """Withdraw the queued and running jobs of an image (of every image when None): a
        queued job will not run, and a running one's image is evicted once its download
        ends (the download itself goes on for the clients reading it). Returns how many."""
        withdrawn = [job for job in self._active if job.state != "withdrawn"
                     and (image_id is None or job.image_id == image_id)]
        for job in withdrawn:
            if job.state == "queued":
                self._end(job, "withdrawn")
            else:
                job.state = "withdrawn"
        return len(withdrawn)

    async def close(self) -> None:
        """Stop the workers (running fills go on until the registry closes)."""
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)

    async def _work(self) -> None:
        while True:
            job = await self._queue.get()
            if job.state == "withdrawn":
                continue  # withdrawn while queued: already ended
            job.state = "running"
            outcome = "failed"
            try:
                await self._prefetch(job)
                outcome = "cached"
            except (Denied, ImgcacheError, NoSpace) as exc:
                job.error = _reason(exc)
                log.warning("prefetch of %s failed: %s", job.image_id, job.error)
            finally:
                if job.state == "withdrawn":
                    if outcome == "cached":
                        self._store.remove(job.image_id)
                    outcome = "withdrawn"
                self._end(job, outcome)

    def _end(self, job: PrefetchJob, state: str) -> None:
        job.state = state
        self._metrics.prefetches.labels(state).inc()
        self._active.remove(job)
        self._finished.append(job)

    async def _prefetch(self, job: PrefetchJob) -> None:
        headers = {"X-Auth-Token": job.token}
        info = await self._authorizer.authorize(job.image_id, headers)
        if info.status != "active" or info.expected is None:
            raise ImgcacheError(f"image is {info.status} with size {info.size}: "
                                "only active images with data can be cached", status=409)
        job.size = info.expected.size
        entry = self._store.get(job.image_id)
        if job.pin and not (entry and entry.pinned):
            self._store.check_pin_fits(job.size)
        for _ in range(3):
            joined = self._fills.join_or_start(job.image_id, info.expected, headers)
            if isinstance(joined, Bypass):
                raise NoSpace(joined.reason)
            if isinstance(joined, Cached):
                break
            job.fill = joined.fill
            await job.fill.wait_ended()
            if job.fill.failure is not None:
                raise ImgcacheError(f"the download failed: {job.fill.failure}")
        if self._store.current_entry(job.image_id, info.expected.key) is None:
            raise ImgcacheError("the image was downloaded but could not be kept")
        if job.pin:
            self._store.set_pinned(job.image_id, True)
        log.info("prefetched %s%s", job.image_id, " (pinned)" if job.pin else "")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, Denied):
        return f"Glance refused the token ({exc.status}): {exc.body[:200].decode(errors='replace')}"
    return str(exc)
