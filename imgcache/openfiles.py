"""Cached image files kept open between hits, as nginx's open_file_cache does.

Opening a file is a trip to a worker thread (it may wait on the disk); for a small image
that trip costs as much as sending it. So the fd of a recently hit file stays open, shared
by every hit that reads it: sendfile(2) is given an offset each time and never moves the
file position, so readers never disturb each other. An fd is closed once its file left the
cache (evicted, dropped, found changed) and its last reader finished, or once it fell out
of the most recently used ``capacity``.
"""

from __future__ import annotations

import asyncio
import os
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

#: Files kept open with no reader, most recently used first; well under LimitNOFILE.
OPEN_FILES_KEPT = 256


class OpenFile:
    """An open fd of one committed file and the readers using it."""

    def __init__(self, name: str, fd: int, size: int) -> None:
        self.name = name
        self.fd = fd
        self.size = size
        self.readers = 0
        self.retired = False  # close once the last reader is done; never hand out again


class OpenFiles:
    """The fds of recently read cache files, by file name. Used on the event loop only;
    opening and closing run on the ``files`` threads (a close may free a deleted file)."""

    def __init__(self, files: ThreadPoolExecutor, capacity: int = OPEN_FILES_KEPT) -> None:
        self._files = files
        self._capacity = capacity
        self._open: OrderedDict[str, OpenFile] = OrderedDict()  # least recently used first
        self._closing: set[asyncio.Future[None]] = set()

    async def acquire(self, directory: Path, name: str, size: int) -> OpenFile:
        """An open file ``name`` of ``directory`` for one reader, who must ``release`` it.
        Raises OSError when the file cannot be opened or its size is not ``size``."""
        handle = self._open.get(name)
        if handle is None:
            loop = asyncio.get_running_loop()
            fd = await loop.run_in_executor(self._files, open_sized, directory / name, size)
            handle = self._open.get(name)  # another reader may have opened it meanwhile
            if handle is None:
                handle = OpenFile(name, fd, size)
                self._open[name] = handle
            else:
                self._close_later(fd)
        self._open.move_to_end(name)
        handle.readers += 1
        self._trim()
        return handle

    def release(self, handle: OpenFile) -> None:
        """One reader is done with ``handle``."""
        handle.readers -= 1
        if handle.retired and handle.readers == 0:
            self._close_later(handle.fd)
        else:
            self._trim()

    def retire(self, name: str) -> None:
        """The file called ``name`` left the cache: stop handing out its fd, and close it
        when its last reader is done."""
        handle = self._open.pop(name, None)
        if handle is None:
            return
        handle.retired = True
        if handle.readers == 0:
            self._close_later(handle.fd)

    async def close(self) -> None:
        """Retire every file and wait for the fds without readers to be closed."""
        for name in list(self._open):
            self.retire(name)
        await asyncio.gather(*self._closing)

    def _trim(self) -> None:
        excess = len(self._open) - self._capacity
        if excess <= 0:  # the usual case, on every hit: no walk over the open files
            return
        for name in list(self._open):
            if excess <= 0:
                break
            if self._open[name].readers == 0:
                self.retire(name)
                excess -= 1

    def _close_later(self, fd: int) -> None:
        closing = asyncio.get_running_loop().run_in_executor(self._files, os.close, fd)
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)


def open_sized(path: Path, size: int) -> int:
    """Open a cached file for reading, checking it still has its recorded size."""
    fd = os.open(path, os.O_RDONLY)
    actual = os.fstat(fd).st_size
    if actual != size:
        os.close(fd)
        raise OSError(f"{path.name} has {actual} bytes, {size} were committed")
    return fd
