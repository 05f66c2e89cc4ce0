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

import contextlib
import logging
import mmap
import threading
from collections.abc import Hashable

log = logging.getLogger(__name__)

#: Size of one mapping (a multiple of mmap.ALLOCATIONGRANULARITY).
WINDOW_BYTES = 4 << 20
#: Bound of the bytes mapped at once, over every file (the readers of a storm share a few
#: windows: they move through the image together).
MAX_MAPPED_BYTES = 32 << 20


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
        # Something may still hold a slice of the view: a tracer keeping a failed write's
        # frames alive (the tests' blockbuster wraps os.write, and its frame holds the
        # arguments). The mapping then goes with the last slice.
        with contextlib.suppress(BufferError):
            self._mapping.close()


class MappedWindows:
    """The windows mapped now, each shared by the readers holding it. Safe on any thread."""

    def __init__(self, window_bytes: int = WINDOW_BYTES,
                 max_bytes: int = MAX_MAPPED_BYTES) -> None:
        if window_bytes <= 0 or window_bytes % mmap.ALLOCATIONGRANULARITY:
            raise ValueError(f"a window of {window_bytes} bytes is not a positive multiple "
                             f"of {mmap.ALLOCATIONGRANULARITY}")
        self._window_bytes = window_bytes
        self._max_bytes = max_bytes
        self._mapped = 0  # bytes of the windows mapped or being mapped
        self._windows: dict[tuple[Hashable, int], Window] = {}
        self._lock = threading.Lock()
        self._warned = False

    @property
    def mapped_bytes(self) -> int:
        """Bytes mapped now."""
        return self._mapped

    def hold(self, key: Hashable, fd: int, position: int, written: int,
             size: int) -> Window | None:
        """The window holding byte ``position`` of the file ``key`` (``size`` bytes, of which
        the first ``written`` are written), with one more holder; mapped from ``fd`` if no
        reader holds it yet. None when the writer has not finished that window, when
        mapping it would pass the bound, or when the file cannot be mapped (the caller
        sends with sendfile then). Runs on a sending thread: it may map."""
        if position >= size:
            return None
        index = position // self._window_bytes
        start = index * self._window_bytes
        length = min(self._window_bytes, size - start)
        if written < start + length:
            return None
        with self._lock:
            window = self._windows.get((key, index))
            if window is not None:
                window.holders += 1
                return window
            if self._mapped + length > self._max_bytes:
                return None
            self._mapped += length  # room kept while it is mapped, outside the lock
        try:
            mapping = mmap.mmap(fd, length, prot=mmap.PROT_READ, offset=start)
        except (OSError, ValueError) as exc:
            with self._lock:
                self._mapped -= length
            self._cannot_map(exc)
            return None
        made = Window(key, index, start, mapping)
        with self._lock:
            window = self._windows.setdefault((key, index), made)
            window.holders += 1
            if window is not made:  # another reader mapped it meanwhile
                self._mapped -= length
        if window is not made:
            made.unmap()
        return window

    def drop(self, window: Window) -> None:
        """One holder is done with ``window``; the last one unmaps it."""
        with self._lock:
            window.holders -= 1
            if window.holders:
                return
            del self._windows[window.key, window.index]
        window.unmap()
        with self._lock:
            self._mapped -= window.length

    def _cannot_map(self, error: Exception) -> None:
        """A file shorter than the window (truncated under its readers) is sendfile's to
        report; anything else is said once, since every reader now sends with sendfile."""
        if isinstance(error, OSError) and not self._warned:
            self._warned = True
            log.warning("cannot map image files for the readers of downloads in flight (%s); "
                        "they are sent with sendfile, at a higher CPU cost to local clients",
                        error)
