"""What an image must hash to, and running hashes that check it.

Glance publishes ``os_hash_algo``/``os_hash_value`` (sha512 by default) and an md5
``checksum``; an image added through the location API can be active with neither yet.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_READ_BYTES = 1 << 20


@dataclass(frozen=True)
class Expected:
    """The verification an image's fill must pass.

    ``method`` is "os_hash", "checksum" or "size_only"; ``algo``/``value`` are the hash to
    match (empty for size_only). ``key`` identifies this exact image content: a cache
    entry counts only while its key equals the one in Glance's current metadata.
    """

    size: int
    method: str
    algo: str
    value: str

    @property
    def key(self) -> str:
        """A string that changes whenever the image's published content identity changes."""
        return f"{self.method}:{self.algo}:{self.value}:{self.size}"

    @classmethod
    def from_key(cls, key: str) -> Expected:
        """The Expected whose ``key`` this is (entries store only the key)."""
        method, algo, value, size = key.split(":")
        return cls(int(size), method, algo, value)

    def new_hasher(self) -> Any | None:
        """A fresh hashlib object for ``algo``, or None when only the size is checked."""
        return hashlib.new(self.algo) if self.algo else None

    def matches(self, hexdigest: str | None, size: int) -> bool:
        """True when a fill of ``size`` bytes hashing to ``hexdigest`` is this image."""
        if size != self.size:
            return False
        return self.method == "size_only" or (hexdigest or "").lower() == self.value.lower()


def expected_from_metadata(size: int, meta: dict[str, Any]) -> Expected:
    """Choose the strongest check the metadata allows: os_hash, else md5 checksum, else size."""
    algo = meta.get("os_hash_algo")
    value = meta.get("os_hash_value")
    if algo and value and str(algo).lower() in hashlib.algorithms_available:
        return Expected(size, "os_hash", str(algo).lower(), str(value).lower())
    checksum = meta.get("checksum")
    if checksum:
        return Expected(size, "checksum", "md5", str(checksum).lower())
    return Expected(size, "size_only", "", "")


def hash_fd(fd: int, hasher: Any | None, length: int | None = None,
            rate: float | None = None, progress: Callable[[int], None] | None = None) -> int:
    """Blocking (run it on a thread): feed the bytes of ``fd`` from offset 0 to ``hasher``
    (None: only count them), up to ``length`` bytes (None: to the end), reading at most
    ``rate`` bytes per second and telling ``progress`` each chunk's size. Returns how many
    bytes were read; fewer than ``length`` means the file is shorter."""
    started = time.monotonic()
    done = 0
    while length is None or done < length:
        want = _READ_BYTES if length is None else min(_READ_BYTES, length - done)
        chunk = os.pread(fd, want, done)
        if not chunk:
            break
        if hasher is not None:
            hasher.update(chunk)
        done += len(chunk)
        if progress is not None:
            progress(len(chunk))
        if rate:
            ahead = done / rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
    return done
