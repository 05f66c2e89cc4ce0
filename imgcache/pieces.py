"""Reused receive buffers for image downloads, and the pieces of them handed to the threads
that write and hash a download.

A download's bytes are received straight into buffers of a ``PiecePool`` (``recv_into``, no
copy on the way) and handed on as ``Piece`` objects: a region of one buffer. Every holder of
a piece (the download itself, the writer thread, the hashing thread) holds a reference and
drops it when done; a buffer goes back to the pool, to be received into again, only once
every reference to every piece of it was dropped and the download moved on to another buffer.
So a byte is never overwritten while a thread still reads it, and a download's memory is
bounded by its pool (``max_buffers`` x ``buffer_size``) whatever the image size.

References are dropped on any thread; the pool's lock guards the counts and the free list.
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class Buffer:
    """One receive buffer of a pool, and the references held to its pieces."""

    __slots__ = ("data", "refs", "view")

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)
        self.view = memoryview(self.data)
        self.refs = 0


class PiecePool:
    """At most ``max_buffers`` buffers of ``buffer_size`` bytes, made as they are first
    needed. A receiver that found none free (``take_or_want``) is called back through
    ``on_free`` once as many as it asked for are free again, on whichever thread gave the
    last of them back: ``on_free`` must only schedule work on the event loop
    (``loop.call_soon_threadsafe``)."""

    def __init__(self, buffer_size: int, max_buffers: int,
                 on_free: Callable[[], None]) -> None:
        self.buffer_size = buffer_size
        self._max = max_buffers
        self._on_free = on_free
        self._made = 0
        self._free: list[Buffer] = []
        self._lock = threading.Lock()
        self._closed = False
        self._wanted = 0  # free buffers the receiver waits for (0: it waits for none)

    def take_or_want(self, count: int) -> Buffer | None:
        """A buffer to receive into, held by the caller (``drop`` it when moving on), or None
        when every buffer is in use: ``on_free`` runs then once ``count`` of them are
        (waking the receiver for several buffers, not each one, spares the loop a thread
        round trip and a pause and resume of its reading per buffer while the threads
        behind are the bound). A later call replaces the count."""
        with self._lock:
            buffer = self._take()
            self._wanted = 0 if buffer is not None or self._closed else min(count, self._max)
            return buffer

    def _take(self) -> Buffer | None:
        if self._free:
            buffer = self._free.pop()
        elif self._made < self._max:
            self._made += 1
            buffer = Buffer(self.buffer_size)
        else:
            return None
        buffer.refs = 1
        return buffer

    def _free_count(self) -> int:
        return len(self._free) + self._max - self._made

    def piece(self, buffer: Buffer, start: int, stop: int) -> Piece:
        """A new piece of ``buffer``, bytes ``start``..``stop``, with one reference."""
        with self._lock:
            buffer.refs += 1
        return Piece(buffer.view[start:stop], self, buffer)

    def retain(self, buffer: Buffer, count: int) -> None:
        """``count`` more references to a buffer's piece."""
        with self._lock:
            buffer.refs += count

    def drop(self, buffer: Buffer) -> None:
        """Give back one reference to ``buffer``; the last one returns it to the pool."""
        with self._lock:
            buffer.refs -= 1
            if buffer.refs or self._closed:
                return
            self._free.append(buffer)
            wake = 0 < self._wanted <= self._free_count()
            if wake:
                self._wanted = 0
        if wake:
            self._on_free()

    def close(self) -> None:
        """The download is over: its buffers are freed as soon as nobody holds them (now,
        not at the next garbage collection: the receiver and its pool refer to each other)."""
        with self._lock:
            self._closed = True
            self._free.clear()
            self._wanted = 0
        self._on_free = _nothing


class Piece:
    """Bytes of a download: a region of a pool buffer, or bytes of their own (``of``).
    ``view`` may be read until ``release``; each ``retain`` needs one more ``release``."""

    __slots__ = ("_buffer", "_pool", "view")

    def __init__(self, view: memoryview, pool: PiecePool | None = None,
                 buffer: Buffer | None = None) -> None:
        self.view = view
        self._pool = pool
        self._buffer = buffer

    @classmethod
    def of(cls, data: bytes) -> Piece:
        """A piece holding ``data`` itself (nothing to give back)."""
        return cls(memoryview(data))

    def __len__(self) -> int:
        return len(self.view)

    def narrow(self, start: int, stop: int) -> None:
        """Keep only bytes ``start``..``stop`` of the piece."""
        self.view = self.view[start:stop]

    def retain(self, count: int = 1) -> None:
        """``count`` more holders of this piece (each calls ``release``)."""
        if self._pool is not None and self._buffer is not None:
            self._pool.retain(self._buffer, count)

    def release(self) -> None:
        """One holder is done with the piece (safe on any thread)."""
        if self._pool is not None and self._buffer is not None:
            self._pool.drop(self._buffer)


def _nothing() -> None:
    """What a closed pool calls when a buffer comes free: nothing."""
