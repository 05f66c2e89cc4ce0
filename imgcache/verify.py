"""Re-hashing cached files against their digests: on demand (``imgcache verify``) and in a
rate-limited background scrub, so that bit rot on the cache disk is found and evicted
before a client is served a corrupt image."""

from __future__ import annotations

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from imgcache.digest import Expected, hash_fd
from imgcache.metrics import Metrics
from imgcache.store import Entry, Store

log = logging.getLogger(__name__)


def hash_file(path: Path, expected: Expected, rate: float | None) -> tuple[bool, int]:
    """Runs on a thread: hash ``path`` and compare with ``expected``, reading at most
    ``rate`` bytes per second. Returns (matches, bytes read)."""
    hasher = expected.new_hasher()
    fd = os.open(path, os.O_RDONLY)
    try:
        done = hash_fd(fd, hasher, rate=rate)
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
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="imgcache-verify")

    async def verify(self, entry: Entry, rate: float | None = None) -> str:
        """Re-hash one entry: "ok", "corrupt" (then evicted) or "missing"."""
        loop = asyncio.get_running_loop()
        expected = Expected.from_key(entry.content_key)
        try:
            ok, done = await loop.run_in_executor(
                self._thread, hash_file, self._store.path_of(entry), expected, rate)
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
            log.info("scrub: re-hashing %d cached images at up to %.0f MB/s", len(entries),
                     rate / 1e6)
            results = [await self.verify(entry, rate) for entry in entries
                       if self._store.get(entry.image_id) is entry]
            log.info("scrub done: %d ok, %d corrupt, %d missing", results.count("ok"),
                     results.count("corrupt"), results.count("missing"))

    def close(self) -> None:
        """Stop the verification thread (after its current file)."""
        self._thread.shutdown(wait=False, cancel_futures=True)

