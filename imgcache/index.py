"""The cache's index: one diskcache (SQLite) record per committed entry, the only module that
touches diskcache. Every SQLite call runs on the index's own thread (one thread keeps the
writes in the order they were made); writes can be queued in the background, and closing
waits for them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import diskcache

from imgcache.entry import Entry
from imgcache.threadnames import INDEX, named_executor

log = logging.getLogger(__name__)


class CacheIndex:
    """The persistent table of entries, by image id."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._thread = named_executor(1, INDEX)
        self._cache: diskcache.Cache | None = None
        self._pending: set[asyncio.Future[Any]] = set()

    async def open(self) -> list[tuple[str, Entry | None]]:
        """Open (or create) the index and read every record: (key, the entry, or None for a
        record that is not a valid entry)."""
        return await self._run(self._open_sync)

    async def write(self, entries: Iterable[Entry]) -> None:
        """Write the records of ``entries`` now, in one transaction (raises on failure)."""
        await self._run(self._write_sync, [asdict(e) for e in entries])

    def write_later(self, entries: Iterable[Entry]) -> None:
        """Queue the records of ``entries`` for writing (a failure is logged)."""
        self._later(self._write_sync, [asdict(e) for e in entries])

    def delete_later(self, entries: Iterable[Entry]) -> None:
        """Queue the deletion of these entries' records (each only if it still names the
        entry's file: a newer commit of the image keeps its record)."""
        self._later(self._delete_sync, [(e.image_id, e.file_name) for e in entries])

    def delete_keys_later(self, keys: Iterable[str]) -> None:
        """Queue the deletion of records by key (invalid ones found at open)."""
        self._later(self._delete_keys_sync, list(keys))

    async def close(self) -> None:
        """Finish the queued writes and close the index."""
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        if self._cache is not None:
            await self._run(self._cache.close)
        self._thread.shutdown(wait=False)

    async def _run(self, func: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._thread, func, *args)

    def _later(self, func: Any, *args: Any) -> None:
        future = asyncio.get_running_loop().run_in_executor(self._thread, func, *args)
        self._pending.add(future)
        future.add_done_callback(self._done)

    def _done(self, future: asyncio.Future[Any]) -> None:
        self._pending.discard(future)
        if not future.cancelled() and future.exception() is not None:
            log.error("writing the cache index failed: %s", future.exception())

    def _open_sync(self) -> list[tuple[str, Entry | None]]:
        self._cache = diskcache.Cache(
            str(self._directory), eviction_policy="none", cull_limit=0, size_limit=2**62,
            statistics=False,
        )
        with self._cache.transact():  # one transaction: 10,000 reads in well under a second
            rows = [(key, self._cache.get(key)) for key in list(self._cache.iterkeys())]
        records: list[tuple[str, Entry | None]] = []
        for key, raw in rows:
            try:
                records.append((key, Entry(**raw)))
            except TypeError:
                records.append((key, None))
        return records

    def _write_sync(self, records: list[dict[str, Any]]) -> None:
        assert self._cache is not None
        with self._cache.transact():
            for record in records:
                self._cache.set(record["image_id"], record)

    def _delete_sync(self, names: list[tuple[str, str]]) -> None:
        assert self._cache is not None
        with self._cache.transact():
            for image_id, file_name in names:
                current = self._cache.get(image_id)
                if current is not None and current.get("file_name") == file_name:
                    self._cache.delete(image_id)

    def _delete_keys_sync(self, keys: list[str]) -> None:
        assert self._cache is not None
        with self._cache.transact():
            for key in keys:
                self._cache.delete(key)
