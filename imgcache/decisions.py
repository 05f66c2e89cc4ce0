"""Glance's recent "allowed" answers, remembered per (credentials, image) for a short TTL.

Only allowed answers are kept (a denial is asked again every time), bounded in number, and
indexed by image so that everything known about one image can be forgotten at once (when
Glance says it was deactivated or deleted, or an operator evicts it).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Generic, TypeVar

#: Most decisions kept; the oldest go first when it is reached.
MAX_DECISIONS = 10_000

T = TypeVar("T")


class Decisions(Generic[T]):
    """What Glance allowed, by (credential fingerprint, image id), each for ``ttl`` seconds."""

    def __init__(self, ttl: float, capacity: int = MAX_DECISIONS) -> None:
        self.ttl = ttl
        self._capacity = capacity
        # Oldest first: with one TTL the front is the first to expire (after a reload that
        # shortened it, later ones may expire first; ``get`` checks every entry it returns).
        self._allowed: OrderedDict[tuple[str, str], tuple[float, T]] = OrderedDict()
        self._by_image: dict[str, set[str]] = {}

    def __len__(self) -> int:
        return len(self._allowed)

    def set_ttl(self, ttl: float) -> None:
        """Change the TTL (a reload): answers already kept expire no later than the new TTL
        from now, so that a shorter TTL (0 included) closes the window at once."""
        self.ttl = ttl
        if ttl <= 0:
            self.clear()
            return
        latest = time.monotonic() + ttl
        for key, (expires, answer) in self._allowed.items():
            if expires > latest:
                self._allowed[key] = (latest, answer)

    def clear(self) -> None:
        """Forget every answer."""
        self._allowed.clear()
        self._by_image.clear()

    def get(self, fingerprint: str, image_id: str) -> T | None:
        """The remembered answer, or None if there is none or it expired."""
        remembered = self._allowed.get((fingerprint, image_id))
        if remembered is None:
            return None
        if remembered[0] <= time.monotonic():
            self._drop((fingerprint, image_id))
            return None
        return remembered[1]

    def remember(self, fingerprint: str, image_id: str, answer: T) -> None:
        """Keep an allowed answer for ``ttl`` seconds (nothing when the TTL is 0)."""
        if self.ttl <= 0:
            return
        key = (fingerprint, image_id)
        self._drop(key)
        self._expire()
        while len(self._allowed) >= self._capacity:
            self._drop(next(iter(self._allowed)))
        self._allowed[key] = (time.monotonic() + self.ttl, answer)
        self._by_image.setdefault(image_id, set()).add(fingerprint)

    def forget_image(self, image_id: str) -> int:
        """Drop every answer about one image; return how many were dropped."""
        fingerprints = self._by_image.pop(image_id, set())
        for fingerprint in fingerprints:
            self._allowed.pop((fingerprint, image_id), None)
        return len(fingerprints)

    def _expire(self) -> None:
        now = time.monotonic()
        while self._allowed:
            key, (expires, _) = next(iter(self._allowed.items()))
            if expires > now:
                return
            self._drop(key)

    def _drop(self, key: tuple[str, str]) -> None:
        if self._allowed.pop(key, None) is None:
            return
        fingerprints = self._by_image.get(key[1])
        if fingerprints is not None:
            fingerprints.discard(key[0])
            if not fingerprints:
                del self._by_image[key[1]]
