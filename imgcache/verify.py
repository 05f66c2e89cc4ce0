"""Re-hashing cached files against their digests: on demand (``imgcache verify``) and in a
rate-limited background scrub, so that bit rot on the cache disk is found and evicted
before a client is served a corrupt image."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from imgcache.config import format_size
from imgcache.digest import Expected, hash_fd
from imgcache.metrics import Metrics
from imgcache.store import Entry, Store
from imgcache.threadnames import VERIFY, named_executor

log = logging.getLogger(__name__)

_run_ids = itertools.count(1)
#: Finished verification runs kept for the CLI to read their results.
_KEEP_RUNS = 10


@dataclass
class VerifyRun:
    """One ``imgcache verify``: the entries to re-hash, bytes done so far, results."""

    total_bytes: int
    results: dict[str, str]
    run_id: int = field(default_factory=lambda: next(_run_ids))
    done_bytes: int = 0
    state: str = "running"  # running, done

    def count(self, read: int) -> None:
        """Bytes re-hashed (called by the verification thread as it reads)."""
        self.done_bytes += read

    def describe(self) -> dict[str, object]:
        """The run as the management API shows it."""
        return {"run_id": self.run_id, "state": self.state, "total_bytes": self.total_bytes,
                "done_bytes": self.done_bytes, "results": self.results}


def hash_file(path: Path, expected: Expected, rate: float | None,
              progress: Callable[[int], None] | None = None) -> tuple[bool, int]:
    """Runs on a thread: hash ``path`` and compare with ``expected``, reading at most
    ``rate`` bytes per second, telling ``progress`` each chunk's size. Returns (matches,
    bytes read)."""
    hasher = expected.new_hasher()
    fd = os.open(path, os.O_RDONLY)
    try:
        done = hash_fd(fd, hasher, rate=rate, progress=progress)
    finally:
        os.close(fd)
    digest = hasher.hexdigest() if hasher is not None else None
    return expected.matches(digest, done), done


class Verifier:
    """Checks cached entries; a bad one is evicted and counted."""

    def __init__(self, store: Store, metrics: Metrics) -> None:
        self._store = store
        self._metrics = metrics
        # One thread: verification never takes more than a core from serving.
        self._thread = named_executor(1, VERIFY)
        self._runs: deque[VerifyRun] = deque(maxlen=_KEEP_RUNS)
        self._tasks: set[asyncio.Task[None]] = set()

    def start_run(self, entries: list[Entry], not_cached: list[str]) -> VerifyRun:
        """Re-hash ``entries`` in the background, one after the other; the run's progress
        and results are read with ``run``."""
        run = VerifyRun(total_bytes=sum(e.size for e in entries),
                        results={i: "not cached" for i in not_cached})
        self._runs.append(run)
        task = asyncio.get_running_loop().create_task(self._work(run, entries))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return run

    def run(self, run_id: int) -> VerifyRun | None:
        """A recent verification run by its id."""
        return next((r for r in self._runs if r.run_id == run_id), None)

    async def _work(self, run: VerifyRun, entries: list[Entry]) -> None:
        try:
            for entry in entries:
                before = run.done_bytes
                run.results[entry.image_id] = await self.verify(entry, progress=run.count)
                run.count(entry.size - (run.done_bytes - before))  # a missing file's share
        finally:
            run.state = "done"

    async def verify(self, entry: Entry, rate: float | None = None,
                     progress: Callable[[int], None] | None = None) -> str:
        """Re-hash one entry: "ok", "corrupt" (then evicted) or "missing"."""
        loop = asyncio.get_running_loop()
        expected = Expected.from_key(entry.content_key)
        try:
            ok, done = await loop.run_in_executor(
                self._thread, hash_file, self._store.path_of(entry), expected, rate, progress)
        except FileNotFoundError:
            if self._store.get(entry.image_id) is entry:
                self._store.remove(entry.image_id)
            return "missing"
        self._metrics.verified_bytes.inc(done)
        if ok:
            self._store.mark_verified(entry)
            return "ok"
        self._metrics.verify_failures.inc()
        log.error("cached image %s does not match its %s any more (disk corruption?); "
                  "evicting it", entry.image_id, expected.method)
        if self._store.get(entry.image_id) is entry:
            self._store.remove(entry.image_id)
        return "corrupt"

    async def scrub_forever(self, interval: float, rate: float) -> None:
        """Every ``interval`` seconds, verify every entry at most ``rate`` bytes/s."""
        while True:
            await asyncio.sleep(interval)
            entries = self._store.entries()
            log.info("scrub: re-hashing %d cached images at up to %s/s", len(entries),
                     format_size(rate))
            results = [await self.verify(entry, rate) for entry in entries
                       if self._store.get(entry.image_id) is entry]
            log.info("scrub done: %d ok, %d corrupt, %d missing", results.count("ok"),
                     results.count("corrupt"), results.count("missing"))

    def close(self) -> None:
        """Stop verification runs and the thread (after its current file)."""
        for task in self._tasks:
            task.cancel()
        self._thread.shutdown(wait=False, cancel_futures=True)

