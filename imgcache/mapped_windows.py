"""Read-only memory mappings of the finished stretches of fill files, shared by the threads
that send those files to the fills' readers.

Why a reader of a fill is sent copies from a mapping and not sendfile(2): the clients of a
sidecar are on its own host, and a local receiver takes sendfile'd page-cache pages (one
4 KiB page per fragment) in at a far higher CPU cost than the sender's copy costs. Measured
on a 2-core VM, 32 curl clients on one cold 128 MiB image: see the README's "Benchmarks".
Hits keep sendfile: they go out zero-copy.

Only the kernel reads a mapping (``os.write`` of a slice to the client's socket), so a page
that cannot be read (the file truncated under us, a disk error) fails that write with EFAULT
instead of killing the process with SIGBUS, as a read from Python would.

A window is WINDOW_BYTES of one file, mapped once the file's writer has written all of it
(a mapping never covers bytes still being written) by the first sending step that needs it,
shared by the steps sending from it at the same time, and unmapped by the last of them.
Mapped pages count in the process's RSS: at most MAX_MAPPED_BYTES are mapped at once, and a
step finding no room sends with sendfile.
"""

from __future__ import annotations

import logging
import math
import mmap
import threading
import time
from collections.abc import Hashable

log = logging.getLogger(__name__)

#: Size of one mapping (a multiple of mmap.ALLOCATIONGRANULARITY).
WINDOW_BYTES = 4 << 20
#: Bound of the bytes mapped at once, over every file: room for one window per sending
#: thread (app.FILE_THREADS), a guard should there be more.
MAX_MAPPED_BYTES = 32 << 20
#: How a sending step sends: from a window (MAPPED), else with sendfile because the window
#: is not finished, there is no room under MAX_MAPPED_BYTES, or mapping failed. The labels
#: of imgcache_fill_reader_bytes_total.
MAPPED, UNFINISHED, NO_ROOM, MAP_FAILED = "mapped", "unfinished", "no_room", "map_failed"
HOW_SENT = (MAPPED, UNFINISHED, NO_ROOM, MAP_FAILED)
#: Seconds between two warnings about files that cannot be mapped.
WARNING_INTERVAL = 60.0


class Window:
    """Bytes ``start``..``end`` of one file, mapped read-only; ``view`` may
    only be handed to the kernel (``os.write``), never read by Python."""

    __slots__ = ("_mapping", "holders", "index", "key", "length", "start", "view")

    def __init__(self, key: Hashable, index: int, start: int, mapping: mmap.mmap) -> None:
        self.key = key
        self.index = index
        self.start = start
        self._mapping = mapping
        self.view = memoryview(mapping)
        self.length = len(mapping)
        self.holders = 0

    @property
    def end(self) -> int:
        """The offset in the file of the first byte after the window."""
        return self.start + self.length

    def unmap(self) -> None:
        """Give the mapping back (no holder is left)."""
        self.view.release()
        self._mapping.close()


class MappedWindows:
    """The windows mapped now, each shared by the readers holding it. Used on the sending
    threads only (mapping and unmapping happen under its lock, never on the event loop)."""

    def __init__(self, window_bytes: int = WINDOW_BYTES,
                 max_bytes: int = MAX_MAPPED_BYTES) -> None:
        if window_bytes <= 0 or window_bytes % mmap.ALLOCATIONGRANULARITY:
            raise ValueError(f"a window of {window_bytes} bytes is not a positive multiple "
                             f"of {mmap.ALLOCATIONGRANULARITY}")
        if max_bytes < window_bytes:
            raise ValueError(f"a bound of {max_bytes} bytes leaves no room for one window "
                             f"of {window_bytes}")
        self._window_bytes = window_bytes
        self._max_bytes = max_bytes
        self._mapped = 0
        self._windows: dict[tuple[Hashable, int], Window] = {}
        self._lock = threading.Lock()
        self._last_warning = -math.inf

    @property
    def mapped_bytes(self) -> int:
        """Bytes mapped now."""
        return self._mapped

    def hold(self, key: Hashable, fd: int, position: int, written: int,
             size: int) -> tuple[Window | None, str]:
        """The window holding byte ``position`` of the file ``key`` (``size`` bytes, of which
        the first ``written`` are written), with one more holder, mapped from ``fd`` if
        nobody holds it yet; and MAPPED. Else None (the caller sends with sendfile) and why:
        UNFINISHED (the writer has not written all of that window), NO_ROOM (mapping it
        would pass the bound) or MAP_FAILED (the file cannot be mapped)."""
        if position >= size:
            return None, UNFINISHED
        index = position // self._window_bytes
        start = index * self._window_bytes
        length = min(self._window_bytes, size - start)
        if written < start + length:
            return None, UNFINISHED
        with self._lock:
            window = self._windows.get((key, index))
            if window is None:
                if self._mapped + length > self._max_bytes:
                    return None, NO_ROOM
                try:
                    mapping = mmap.mmap(fd, length, prot=mmap.PROT_READ, offset=start)
                except (OSError, ValueError) as exc:
                    self._cannot_map(exc)
                    return None, MAP_FAILED
                window = self._windows[key, index] = Window(key, index, start, mapping)
                self._mapped += length
            window.holders += 1
            return window, MAPPED

    def drop(self, window: Window) -> None:
        """One holder is done with ``window``; the last one unmaps it."""
        with self._lock:
            window.holders -= 1
            if window.holders:
                return
            del self._windows[window.key, window.index]
        window.unmap()  # outside the lock: other steps go on holding and mapping meanwhile
        with self._lock:
            self._mapped -= window.length

    def _cannot_map(self, error: Exception) -> None:
        """A file shorter than the window (truncated under its readers) is sendfile's to
        report; anything else is logged, at most once a minute."""
        now = time.monotonic()
        if isinstance(error, OSError) and now - self._last_warning >= WARNING_INTERVAL:
            self._last_warning = now
            log.warning("cannot map an image file for the readers of a download in flight "
                        "(%s); they are sent with sendfile meanwhile, at a higher CPU cost to "
                        "local clients", error)
