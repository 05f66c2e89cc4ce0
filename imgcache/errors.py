"""Exceptions that carry the HTTP status a client should see, and their JSON body."""

from __future__ import annotations

import json
from http import HTTPStatus


class ImgcacheError(Exception):
    """Base error: ``status`` is the HTTP status a client gets, ``str(self)`` the reason."""

    status: int = 500

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status

    def body(self) -> bytes:
        """A short JSON body naming the status and what failed, in Glance's error shape."""
        title = HTTPStatus(self.status).phrase
        doc = {"error": {"code": self.status, "title": title, "message": str(self)}}
        return json.dumps(doc).encode()


class BadRequest(ImgcacheError):
    """The client's request is malformed (400)."""

    status = 400


class RangeNotSatisfiable(ImgcacheError):
    """A Range header is malformed or starts at or after the end of the image (416)."""

    status = 416


class UpstreamError(ImgcacheError):
    """Glance could not be reached or failed mid-way (502)."""

    status = 502


class UpstreamTimeout(UpstreamError):
    """Glance did not answer in time (504)."""

    status = 504


class UpstreamUnavailable(UpstreamError):
    """No upstream is configured or every one refused (503)."""

    status = 503


class ConfigError(Exception):
    """A configuration key has a bad value or is unknown; the message names the key."""


class FillError(Exception):
    """A cache fill failed; ``outcome`` is the label counted in imgcache_fills_total."""

    def __init__(self, message: str, outcome: str) -> None:
        super().__init__(message)
        self.outcome = outcome


class NoSpace(Exception):
    """The cache cannot hold an image of this size (larger than the cap, or all pinned)."""


class SizingUnavailable(Exception):
    """An extra that a sizing request needs (``sizing``, or ``policies``) is not installed."""
