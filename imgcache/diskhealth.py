"""The cache disk's recent failures: after a write to the cache fails (disk full, directory
gone, read-only), new images are streamed through uncached for a while before caching is
tried again."""

from __future__ import annotations

import logging
import time

from imgcache.metrics import Metrics

log = logging.getLogger(__name__)

#: Seconds caching pauses after a failed write.
PAUSE_SECONDS = 30.0


class DiskHealth:
    """Whether caching is paused after a disk error, and why."""

    def __init__(self, cache_dir: object, metrics: Metrics) -> None:
        self._cache_dir = cache_dir
        self._metrics = metrics
        self._until = 0.0
        self._error = ""

    def failed(self, error: str) -> None:
        """A write to the cache failed: pause caching, count it, say what to check."""
        self._metrics.disk_errors.inc()
        self._error = error
        self._until = time.monotonic() + PAUSE_SECONDS
        log.error("cache disk error in %s: %s; images are streamed through uncached for "
                  "%.0f s; check free space and permissions", self._cache_dir, error,
                  PAUSE_SECONDS)

    def paused_because(self) -> str | None:
        """Why caching is paused now, or None when it is not."""
        return self._error if time.monotonic() < self._until else None
