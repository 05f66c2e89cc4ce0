"""The cache on disk: its directory, and the table of entries with their accounting.

Layout under ``cache_dir``:
- ``data/``: committed image files, named by ``keys.data_file_name``;
- ``partial/``: files of fills in progress; never served once the process that wrote them
  is gone, and swept at start;
- ``index/``: the persistent table (``index.CacheIndex``, diskcache/SQLite), one record per
  entry.

The table is kept in memory (recency order included), and its totals (bytes cached, pinned,
reserved) are kept up to date on every change, so that a lookup or a reservation on the hot
path never touches SQLite or walks the table; file operations run on the ``files`` threads.

A file is never rewritten in place, not even once its entry left the cache and no fd of it is
open: sendfile(2) queues references to the file's page-cache pages, not copies, so the bytes
a client has not read yet (on loopback: until the client reads them, after imgcache closed
the connection) would change under it. Every fill writes a new file.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from imgcache.config import format_size
from imgcache.diskhealth import DiskHealth
from imgcache.entry import Entry, Reservation
from imgcache.errors import FillError, NoSpace
from imgcache.index import CacheIndex
from imgcache.keys import data_file_name, partial_file_name
from imgcache.metrics import Metrics
from imgcache.recency import RecencyWriter

log = logging.getLogger(__name__)

RemovalListener = Callable[[Entry], None]


class Store:
    """Size-capped, LRU-evicting cache of image files with a persistent index."""

    def __init__(self, cache_dir: Path, max_bytes: int, metrics: Metrics,
                 files: ThreadPoolExecutor) -> None:
        self.cache_dir = cache_dir
        self._data_dir = cache_dir / "data"
        self.max_bytes = max_bytes
        self._metrics = metrics
        self._files = files
        self._index = CacheIndex(cache_dir / "index")
        self._recency = RecencyWriter(self._index)
        self._health = DiskHealth(cache_dir, metrics)
        self._entries: OrderedDict[str, Entry] = OrderedDict()  # least recently used first
        self._entry_bytes = 0
        self._pinned_bytes = 0
        self._reserved_bytes = 0
        self._partial_names = itertools.count(1)
        self._removal_listeners: list[RemovalListener] = []
        self._background: set[asyncio.Future[Any]] = set()
        metrics.cache_max_bytes.set(max_bytes)

    # -- what the cache holds --------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        """Directory of committed image files."""
        return self._data_dir

    @property
    def partial_dir(self) -> Path:
        """Directory of fills in progress."""
        return self.cache_dir / "partial"

    @property
    def pinned_bytes(self) -> int:
        """Bytes of pinned entries (never evicted)."""
        return self._pinned_bytes

    @property
    def used_bytes(self) -> int:
        """Bytes of committed entries plus bytes reserved by fills in progress."""
        return self._entry_bytes + self._reserved_bytes

    @property
    def over_cap_bytes(self) -> int:
        """Bytes above the cap that cannot be evicted (pinned, or reserved by fills in
        progress), after the cap was lowered below them; 0 normally."""
        return max(0, self.used_bytes - self.max_bytes)

    def __len__(self) -> int:
        return len(self._entries)

    def path_of(self, entry: Entry) -> Path:
        """Where an entry's file lives."""
        return self.data_dir / entry.file_name

    def current_entry(self, image_id: str, content_key: str) -> Entry | None:
        """The committed entry of this image if it holds the content Glance now publishes."""
        entry = self._entries.get(image_id)
        return entry if entry is not None and entry.content_key == content_key else None

    def get(self, image_id: str) -> Entry | None:
        """The committed entry of an image, whatever its content."""
        return self._entries.get(image_id)

    def entries(self) -> list[Entry]:
        """All committed entries, least recently used first."""
        return list(self._entries.values())

    def add_removal_listener(self, listener: RemovalListener) -> None:
        """Call ``listener(entry)`` whenever an entry leaves the cache."""
        self._removal_listeners.append(listener)

    # -- start and stop --------------------------------------------------------------------

    async def open(self) -> None:
        """Create the layout, sweep partial files, load the index and reconcile it with the
        files: a record without its file is dropped, a file without its record removed."""
        loop = asyncio.get_running_loop()
        on_disk = await loop.run_in_executor(self._files, self._prepare_layout)
        records = await self._index.open()
        invalid = []
        for key, entry in sorted(records, key=lambda r: r[1].last_access if r[1] else 0):
            if entry is None or entry.file_name not in on_disk:
                log.warning("dropping index record %s: its file is missing", key)
                invalid.append(key)
                continue
            on_disk.discard(entry.file_name)
            self._add_entry(entry)
        if invalid:
            self._index.delete_keys_later(invalid)
        for name in on_disk:
            log.warning("removing %s: a data file with no index record", name)
        if on_disk:
            self._background_call(self._unlink_data, *on_disk)
        self._publish()
        log.info("cache %s opened: %d entries, %s of %s", self.cache_dir,
                 len(self._entries), format_size(self._entry_bytes),
                 format_size(self.max_bytes))
        self._evict_to_cap()

    def _prepare_layout(self) -> set[str]:
        for directory in (self.data_dir, self.partial_dir):
            directory.mkdir(parents=True, exist_ok=True)
        for leftover in self.partial_dir.iterdir():
            log.info("removing partial file %s left by an earlier run", leftover.name)
            leftover.unlink(missing_ok=True)
        return set(os.listdir(self.data_dir))

    async def close(self) -> None:
        """Write pending recency, finish pending file and index work, close the index."""
        self._recency.flush()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        await self._index.close()

    # -- hits and entries that turn out unusable -------------------------------------------

    def record_hit(self, entry: Entry) -> None:
        """A hit read the entry: count it and make it the most recently used (written to
        the index with the next batch). Nothing for an entry that left the cache."""
        if self._entries.get(entry.image_id) is not entry:
            return
        entry.hits += 1
        entry.last_access = time.time()
        self._entries.move_to_end(entry.image_id)
        self._recency.touched(entry)

    def drop_unusable(self, entry: Entry, reason: str) -> None:
        """The entry's file cannot be read as committed: drop the entry (the next request
        is a miss that fetches the image again)."""
        if self._entries.get(entry.image_id) is entry:
            log.warning("entry %s is unusable (%s); dropping it", entry.image_id, reason)
            self.remove(entry.image_id)

    def drop_other_content(self, image_id: str, content_key: str) -> bool:
        """Drop the entry of this image if it holds other content than ``content_key`` (the
        image was re-uploaded or re-hashed); return whether one was dropped."""
        entry = self._entries.get(image_id)
        if entry is None or entry.content_key == content_key:
            return False
        log.info("dropping entry %s: Glance now publishes other content", image_id)
        self.remove(image_id)
        return True

    # -- fills: reserve, commit, or give back ----------------------------------------------

    def reserve(self, size: int) -> Reservation:
        """Set aside ``size`` bytes, evicting least recently used unpinned entries as needed.
        Raises NoSpace, evicting nothing, when the image cannot fit under the cap."""
        if size > self.max_bytes:
            raise NoSpace(f"the image ({format_size(size)}) is larger than the cache cap "
                          f"({format_size(self.max_bytes)})")
        paused = self._health.paused_because()
        if paused is not None:
            raise NoSpace(f"the cache disk failed recently ({paused}); not caching until it "
                          "works again")
        if self._pinned_bytes + self._reserved_bytes + size > self.max_bytes:
            raise NoSpace(f"no room for {format_size(size)}: {format_size(self._pinned_bytes)} "
                          f"pinned and {format_size(self._reserved_bytes)} reserved by fills in "
                          f"progress, under a cap of {format_size(self.max_bytes)}")
        self._evict_lru(self.used_bytes + size - self.max_bytes)
        self._reserved_bytes += size
        self._publish()
        return Reservation(size)

    def release(self, reservation: Reservation) -> None:
        """Give back a reservation's space (a failed or abandoned fill)."""
        if reservation.active:
            reservation.active = False
            self._reserved_bytes -= reservation.size
            self._publish()

    def new_partial_path(self, image_id: str) -> Path:
        """A fresh path for a fill's partial file."""
        return self.partial_dir / partial_file_name(image_id, next(self._partial_names))

    async def commit(self, reservation: Reservation, partial: Path, image_id: str,
                     content_key: str) -> Entry:
        """Adopt a verified partial file: flush it to disk, rename it into ``data/`` and
        write its index record; its bytes are never copied. A failing step leaves nothing:
        the file is taken out of ``data/``, the reservation given back, and FillError
        ("commit_error") raised."""
        now = time.time()
        entry = Entry(image_id=image_id, content_key=content_key, size=reservation.size,
                      file_name=data_file_name(image_id, time.time_ns()),
                      created_at=now, last_access=now, verified_at=now)
        loop = asyncio.get_running_loop()
        step = "adopting the file"
        try:
            await loop.run_in_executor(self._files, self._adopt, partial, entry.file_name)
            step = "writing the index record"
            await self._index.write([entry])
        except Exception as exc:
            if step != "adopting the file":  # the file is in data/ but has no record
                self._background_call(self._unlink_data, entry.file_name)
            self.release(reservation)
            raise FillError(f"committing image {image_id} failed while {step}: {exc}",
                            "commit_error") from exc
        self.release(reservation)
        if image_id in self._entries:  # an older copy, e.g. from before a re-hash
            self.remove(image_id)
        self._add_entry(entry)
        self._publish()
        return entry

    def _adopt(self, partial: Path, file_name: str) -> None:
        """Flush, rename into data/, flush the directory; a failure after the rename takes
        the file out of data/ again, so that nothing is left there without a record."""
        fd = os.open(partial, os.O_RDONLY)
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)
        target = self.data_dir / file_name
        os.rename(partial, target)
        try:
            dir_fd = os.open(self.data_dir, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except BaseException:
            target.unlink(missing_ok=True)
            raise

    def disk_failed(self, error: str) -> None:
        """A write to the cache failed: stream new images through uncached for a while."""
        self._health.failed(error)

    def discard_partial(self, partial: Path) -> None:
        """Delete a failed fill's partial file in the background."""
        self._background_call(partial.unlink, True)

    # -- removal, pins, the cap ------------------------------------------------------------

    def remove(self, image_id: str) -> Entry | None:
        """Drop an entry now; its file and record are deleted in the background. Readers that
        already opened the file keep reading it to the end."""
        removed = self.remove_many([image_id])
        return removed[0] if removed else None

    def remove_many(self, image_ids: list[str]) -> list[Entry]:
        """Drop many entries at once (a clear): one index transaction for all of them."""
        removed = [e for e in (self._entries.pop(i, None) for i in image_ids) if e is not None]
        for entry in removed:
            self._recency.forget(entry.image_id)
            self._entry_bytes -= entry.size
            if entry.pinned:
                self._pinned_bytes -= entry.size
            for listener in self._removal_listeners:
                listener(entry)
        if removed:
            self._publish()
            self._index.delete_later(removed)
            self._background_call(self._unlink_data, *(e.file_name for e in removed))
        return removed

    def check_pin_fits(self, size: int) -> None:
        """Raise NoSpace unless ``size`` more pinned bytes stay under the cap."""
        if self._pinned_bytes + size > self.max_bytes:
            raise NoSpace(f"pinning {format_size(size)} more would exceed the cap: "
                          f"{format_size(self._pinned_bytes)} of "
                          f"{format_size(self.max_bytes)} are pinned already")

    def set_pinned(self, image_id: str, pinned: bool) -> Entry:
        """Pin (never evict) or unpin a committed entry. Raises KeyError if not cached and
        NoSpace if the pins would no longer fit under the cap."""
        entry = self._entries[image_id]
        if pinned and not entry.pinned:
            self.check_pin_fits(entry.size)
        if pinned != entry.pinned:
            self._pinned_bytes += entry.size if pinned else -entry.size
        entry.pinned = pinned
        self._persist(entry)
        self._publish()
        return entry

    def mark_verified(self, entry: Entry) -> None:
        """Record that an entry's file was re-hashed and matched."""
        entry.verified_at = time.time()
        if self._entries.get(entry.image_id) is entry:
            self._persist(entry)

    def set_max_bytes(self, max_bytes: int) -> None:
        """Change the cap (a reload); shrinking it evicts least recently used entries."""
        self.max_bytes = max_bytes
        self._metrics.cache_max_bytes.set(max_bytes)
        self._evict_to_cap()

    def _evict_to_cap(self) -> None:
        """Evict what may go until the cache is under its cap; what is left above it
        (pinned, or reserved by fills) is reported, never refused."""
        self._evict_lru(self.used_bytes - self.max_bytes)
        self._publish()
        if self.over_cap_bytes:
            log.warning("the cache holds %s over its cap of %s that cannot be evicted "
                        "(%s pinned, %s reserved by fills in progress): unpin images "
                        "(imgcache unpin) or raise [cache] max_size",
                        format_size(self.over_cap_bytes), format_size(self.max_bytes),
                        format_size(self._pinned_bytes), format_size(self._reserved_bytes))

    def _evict_lru(self, excess: int) -> None:
        """Evict least recently used unpinned entries until ``excess`` bytes are freed or
        none is left."""
        if excess <= 0:
            return
        victims: list[str] = []
        for entry in self._entries.values():
            if excess <= 0:
                break
            if not entry.pinned:
                victims.append(entry.image_id)
                excess -= entry.size
        for image_id in victims:
            log.info("evicting %s (least recently used) to make room", image_id)
        self.remove_many(victims)
        self._metrics.evictions.inc(len(victims))

    # -- plumbing --------------------------------------------------------------------------

    def _add_entry(self, entry: Entry) -> None:
        self._entries[entry.image_id] = entry
        self._entry_bytes += entry.size
        if entry.pinned:
            self._pinned_bytes += entry.size

    def _persist(self, entry: Entry) -> None:
        self._recency.forget(entry.image_id)
        self._index.write_later([entry])

    def _unlink_data(self, *file_names: str) -> None:
        for name in file_names:
            (self.data_dir / name).unlink(missing_ok=True)

    def _background_call(self, func: Any, *args: Any) -> None:
        future = asyncio.get_running_loop().run_in_executor(self._files, func, *args)
        self._background.add(future)
        future.add_done_callback(self._background_done)

    def _background_done(self, future: asyncio.Future[Any]) -> None:
        self._background.discard(future)
        if not future.cancelled() and future.exception() is not None:
            log.error("cache housekeeping failed: %s", future.exception())

    def _publish(self) -> None:
        self._metrics.cache_bytes.set(self.used_bytes)
        self._metrics.cache_pinned_bytes.set(self._pinned_bytes)
        self._metrics.cache_entries.set(len(self._entries))
        self._metrics.cache_over_cap_bytes.set(self.over_cap_bytes)
