"""The records of the cache: a committed entry, and space reserved for a fill."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Entry:
    """A committed, verified image file. ``content_key`` is ``digest.Expected.key`` at commit."""

    image_id: str
    content_key: str
    size: int
    file_name: str
    created_at: float
    last_access: float
    hits: int = 0
    pinned: bool = False
    verified_at: float = 0.0


@dataclass
class Reservation:
    """Space set aside for one fill; released on failure or turned into an entry on commit."""

    size: int
    active: bool = True
