"""The access history: one 32-byte record per image request that reached the cache path,
kept in ``cache_dir/history/`` across restarts, for ``imgcache sizing`` and the predicted
hit-ratio gauges.

A record holds the image id, the image's size as Glance publishes it, the time (whole
seconds) and how the request was served (hit, miss, coalesced, bypass, error); never a
token or any other header. Requests Glance refused (denied), requests for images that are
not active with a size (Glance answers those itself), and malformed requests are not
recorded: they never reached the cache.

Bound: at most ``max_requests`` records on disk (two files of ``max_requests / 2`` records;
when the newer one is full, the older one is dropped), so at least the last
``max_requests / 2`` requests are always kept. Records reach the disk in batches, at most
``FLUSH_SECONDS`` late: a ``kill -9`` loses at most that much history, never the rest. A file
that is not a history file, or one cut short by a crash, is logged and set aside or trimmed,
never a reason not to start.

Everything on the request path is in memory (a ``bytes`` append and two dict updates); file
writes run on the history's own thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from imgcache.config import parse_duration
from imgcache.history_files import (
    CURRENT,
    HEADER,
    MAGIC,
    PREVIOUS,
    RECORD,
    RESULT_CODES,
    STATE,
    VERSION,
    ServerState,
    check_header,
    history_files,
)
from imgcache.metrics import WORKING_SET_WINDOWS
from imgcache.threadnames import HISTORY, named_executor

log = logging.getLogger(__name__)

_CODE_OF = {name: code for code, name in enumerate(RESULT_CODES)}
#: Records are written to disk at most this many seconds after their request ended...
FLUSH_SECONDS = 5.0
#: ...or as soon as this many are waiting.
FLUSH_RECORDS = 4096
#: The longest working-set window: how far back images are remembered in memory.
LONGEST_WINDOW = max(parse_duration(window) for window in WORKING_SET_WINDOWS)
#: Images whose id bytes and last use are kept in memory (the oldest dropped first; the id
#: is worked out again at its next request).
MAX_KNOWN_IMAGES = 100_000


class AccessHistory:
    """Records image requests and keeps them, bounded, under ``directory``."""

    def __init__(self, directory: Path, max_requests: int,
                 state: Callable[[], ServerState] | None = None) -> None:
        self.directory = directory
        self.max_requests = max_requests
        self._state = state
        self._thread = named_executor(1, HISTORY)
        self._ids: dict[str, bytes] = {}  # image id -> its 16 UUID bytes
        self._last_seen: dict[str, tuple[float, int]] = {}  # image id -> (time, size)
        self._pending: list[bytes] = []
        self._flush_timer: asyncio.TimerHandle | None = None
        self._writes: set[asyncio.Future[Any]] = set()  # writes, and the start-up reload
        self._fd: int | None = None
        self._current_records = 0
        self._last_state: ServerState | None = None

    @property
    def enabled(self) -> bool:
        """False when ``[history] max_requests`` is 0: nothing is recorded."""
        return self.max_requests > 0

    @property
    def file_records(self) -> int:
        """Most records one history file holds before it becomes the previous one."""
        return max(1, self.max_requests // 2)

    async def open(self) -> None:
        """Check the files and set aside bad ones; then, in the background (a full history
        takes about a second), reload the last 7 days' working set."""
        if not self.enabled:
            return
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._thread, self._open_sync)
        except OSError as exc:
            log.error("cannot open the access history in %s (%s); image requests are "
                      "served but not recorded for imgcache sizing until a restart",
                      self.directory, exc)
            return
        reload = loop.run_in_executor(self._thread, self._recent_images,
                                      time.time() - LONGEST_WINDOW)
        self._writes.add(reload)
        reload.add_done_callback(self._reloaded)

    def _reloaded(self, future: asyncio.Future[dict[str, tuple[float, int]]]) -> None:
        self._writes.discard(future)
        if future.cancelled() or future.exception() is not None:
            log.warning("could not reload the working set from the access history: %s",
                        None if future.cancelled() else future.exception())
            return
        for image_id, seen in future.result().items():  # requests since start are newer
            self._last_seen.setdefault(image_id, seen)

    def _open_sync(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        for path in history_files(self.directory):
            if path.exists():
                self._repair(path)
        current = self.directory / CURRENT
        if not current.exists():
            self._new_file(current)
        self._fd = os.open(current, os.O_WRONLY | os.O_APPEND)
        self._current_records = (os.fstat(self._fd).st_size - HEADER.size) // RECORD.size

    def _repair(self, path: Path) -> None:
        """Set aside a file that is not a history file; trim a record cut short by a crash."""
        problem = check_header(path)
        if problem is not None:
            aside = path.with_suffix(".bad")
            log.warning("access history %s is unusable (%s); moved to %s, starting a new "
                        "one", path, problem, aside.name)
            os.replace(path, aside)
            return
        size = path.stat().st_size
        whole = HEADER.size + (size - HEADER.size) // RECORD.size * RECORD.size
        if whole != size:
            log.warning("access history %s ends in a partial record (cut short by a crash?); "
                        "dropping its last %d bytes", path, size - whole)
            os.truncate(path, whole)

    @staticmethod
    def _new_file(path: Path) -> None:
        partial = path.with_suffix(".new")
        with partial.open("wb") as handle:
            handle.write(HEADER.pack(MAGIC, VERSION, RECORD.size))
        os.replace(partial, path)

    def _recent_images(self, since: float) -> dict[str, tuple[float, int]]:
        seen: dict[bytes, tuple[float, int]] = {}
        for path in history_files(self.directory):
            if not path.exists():
                continue
            with path.open("rb") as handle:
                handle.seek(HEADER.size)
                while chunk := handle.read(RECORD.size * 8192):
                    usable = len(chunk) - len(chunk) % RECORD.size
                    for size, raw, when, _ in RECORD.iter_unpack(chunk[:usable]):
                        if when >= since:
                            seen[raw] = (float(when), size)
        return {str(uuid.UUID(bytes=raw)): value for raw, value in seen.items()}

    def record(self, image_id: str, size: int, result: str) -> None:
        """One request for an active image of ``size`` bytes (as Glance published it) ended
        with ``result``; record it if it reached the cache. Runs on the event loop for every
        request: memory only."""
        code = _CODE_OF.get(result)
        if code is None or not self.enabled:
            return
        raw = self._ids.get(image_id)
        if raw is None:
            raw = self._ids[image_id] = uuid.UUID(image_id).bytes
            if len(self._ids) > MAX_KNOWN_IMAGES:
                del self._ids[next(iter(self._ids))]
        now = time.time()
        self._pending.append(RECORD.pack(size, raw, int(now), code))
        self._last_seen[image_id] = (now, size)
        if len(self._pending) >= FLUSH_RECORDS:
            self.flush()
        elif self._flush_timer is None:
            self._flush_timer = asyncio.get_running_loop().call_later(FLUSH_SECONDS,
                                                                      self.flush)

    def working_set_bytes(self, window: float) -> int:
        """Bytes of the distinct images requested within the last ``window`` seconds."""
        since = time.time() - window
        return sum(size for seen, size in self._last_seen.values() if seen >= since)

    def flush(self) -> asyncio.Future[None]:
        """Hand the waiting records (and the server's state when it changed) to the
        history's thread; the future is done once they are written."""
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        records, self._pending = b"".join(self._pending), []
        state = self._state() if self._state is not None and self.enabled else None
        if state == self._last_state:
            state = None
        else:
            self._last_state = state
        self._forget_old_images()
        future = asyncio.get_running_loop().run_in_executor(self._thread, self._write_sync,
                                                            records, state)
        self._writes.add(future)
        future.add_done_callback(self._write_done)
        return future

    def _forget_old_images(self) -> None:
        since = time.time() - LONGEST_WINDOW
        if len(self._last_seen) > MAX_KNOWN_IMAGES:
            self._last_seen = {k: v for k, v in self._last_seen.items() if v[0] >= since}

    def _write_done(self, future: asyncio.Future[None]) -> None:
        self._writes.discard(future)
        if not future.cancelled() and future.exception() is not None:
            log.error("could not write the access history under %s: %s (the requests of "
                      "these seconds are not kept)", self.directory, future.exception())

    def _write_sync(self, records: bytes, state: ServerState | None) -> None:
        if self._fd is None:
            return
        view = memoryview(records)
        while view:
            room = self.file_records - self._current_records
            if room <= 0:
                self._rotate()
                continue
            part = view[:room * RECORD.size]
            os.write(self._fd, part)
            self._current_records += len(part) // RECORD.size
            view = view[len(part):]
        if state is not None:
            partial = self.directory / (STATE + ".new")
            partial.write_text(json.dumps(state.as_json()))
            os.replace(partial, self.directory / STATE)

    def _rotate(self) -> None:
        assert self._fd is not None
        os.close(self._fd)
        os.replace(self.directory / CURRENT, self.directory / PREVIOUS)
        self._new_file(self.directory / CURRENT)
        self._fd = os.open(self.directory / CURRENT, os.O_WRONLY | os.O_APPEND)
        self._current_records = 0

    async def close(self) -> None:
        """Write what is waiting and close the file."""
        if self.enabled and self._fd is not None:
            # A failed write is logged by _write_done; it must not stop the shutdown.
            await asyncio.gather(self.flush(), return_exceptions=True)
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
        await asyncio.get_running_loop().run_in_executor(self._thread, self._close_sync)
        self._thread.shutdown(wait=False)

    def _close_sync(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
