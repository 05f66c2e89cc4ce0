"""Hit recency, written to the index in batches: a hit changes an entry's recency and hit
count in memory at once, and the index gets them at most FLUSH_DELAY seconds later (and at
shutdown). A crash loses at most that much recency, never an entry."""

from __future__ import annotations

import asyncio

from imgcache.entry import Entry
from imgcache.index import CacheIndex

#: Seconds a hit's recency may wait before it is written to the index.
FLUSH_DELAY = 5.0


class RecencyWriter:
    """The entries hit since the last flush, written to ``index`` in one batch."""

    def __init__(self, index: CacheIndex) -> None:
        self._index = index
        self._touched: dict[str, Entry] = {}
        self._flush: asyncio.TimerHandle | None = None

    def touched(self, entry: Entry) -> None:
        """``entry`` was hit: write it with the next batch."""
        self._touched[entry.image_id] = entry
        if self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(FLUSH_DELAY, self.flush)

    def forget(self, image_id: str) -> None:
        """The entry left the cache, or was written on its own: no batch write for it."""
        self._touched.pop(image_id, None)

    def flush(self) -> None:
        """Queue the batch for writing now."""
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        if self._touched:
            self._index.write_later(self._touched.values())
            self._touched = {}
