"""Glance decides who reads an image: every image-data GET is authorized by asking Glance
for the image's metadata with the caller's own headers. Only "allowed" answers are
remembered, per (credentials, image), for a short TTL; credentials are kept as hashes only,
and a caller who sent none is asked about every time."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from multidict import CIMultiDict

from imgcache.digest import Expected, expected_from_metadata
from imgcache.errors import UpstreamError
from imgcache.metrics import Metrics
from imgcache.upstream import Upstream, end_to_end_headers

#: Request headers that cannot carry who the caller is; every OTHER header keys the decision
#: cache, so that no header Glance (or a middleware in front of it) might read as a
#: credential is ever left out: X-Auth-Token, X-Storage-Token, X-Service-Token,
#: Authorization, X-Roles for a noauth Glance, underscore spellings, cookies...
NON_IDENTITY_HEADERS = frozenset({
    "host", "user-agent", "accept", "accept-encoding", "accept-language", "connection",
    "keep-alive", "content-length", "content-type", "transfer-encoding", "expect", "range",
    "if-range", "if-match", "if-none-match", "if-modified-since", "if-unmodified-since",
    "x-openstack-request-id", "te", "upgrade", "via", "x-forwarded-for", "traceparent",
    "tracestate",
})
#: Request headers that must not reach the metadata GET (they describe the data request).
_DATA_ONLY_HEADERS = ("Range", "If-Range", "Content-Length", "Content-Type",
                      "Transfer-Encoding", "Expect", "Accept-Encoding")
_MAX_DECISIONS = 10_000
_MAX_METADATA_BYTES = 4 << 20


@dataclass(frozen=True)
class ImageInfo:
    """What Glance said about an image to a caller it allowed to see it."""

    image_id: str
    status: str
    size: int | None
    checksum: str | None
    expected: Expected | None  # None when the image cannot be cached (no size)


class Denied(Exception):
    """Glance refused (or failed) the metadata GET; its answer goes back to the client."""

    def __init__(self, status: int, headers: CIMultiDict[str], body: bytes) -> None:
        super().__init__(f"Glance answered {status}")
        self.status = status
        self.headers = headers
        self.body = body


def credential_fingerprint(headers: Mapping[str, str]) -> str | None:
    """A hash of every header that could say who the caller is (names folded the way WSGI
    servers fold them: case, and ``_`` as ``-``), so that a decision is reused only for
    exactly the same credentials; None when the caller sent none, whose decisions are never
    reused (Glance may have judged something we cannot see)."""
    identity = sorted(
        (name.lower().replace("_", "-"), value) for name, value in headers.items()
        if name.lower().replace("_", "-") not in NON_IDENTITY_HEADERS
    )
    if not identity:
        return None
    digest = hashlib.sha256()
    for name, value in identity:
        digest.update(f"{name}\0{value}\0".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def image_info(image_id: str, meta: dict[str, Any]) -> ImageInfo:
    """Read the fields that matter from Glance's image JSON."""
    size = meta.get("size")
    size = size if isinstance(size, int) and size >= 0 else None
    return ImageInfo(
        image_id=image_id,
        status=str(meta.get("status")),
        size=size,
        checksum=meta.get("checksum") or None,
        expected=expected_from_metadata(size, meta) if size else None,
    )


class Authorizer:
    """Asks Glance whether a caller may read an image, reusing recent "allowed" answers."""

    def __init__(self, upstream: Upstream, ttl: float, metrics: Metrics) -> None:
        self._upstream = upstream
        self.ttl = ttl
        self._metrics = metrics
        self._allowed: dict[tuple[str, str], tuple[float, ImageInfo]] = {}
        self._asking: dict[tuple[str, str], asyncio.Future[ImageInfo]] = {}

    async def authorize(self, image_id: str, headers: Mapping[str, str]) -> ImageInfo:
        """The image's metadata as this caller sees it; raises Denied with Glance's answer
        when Glance does not answer 200. Concurrent identical questions share one GET."""
        fingerprint = credential_fingerprint(headers)
        if fingerprint is None:
            return await self._ask(None, image_id, headers)
        key = (fingerprint, image_id)
        remembered = self._allowed.get(key)
        if remembered is not None:
            if remembered[0] > time.monotonic():
                self._metrics.auth_checks.labels("allowed_cached").inc()
                return remembered[1]
            del self._allowed[key]
        asking = self._asking.get(key)
        if asking is None:
            asking = asyncio.ensure_future(self._ask(key, image_id, headers))
            self._asking[key] = asking
            asking.add_done_callback(lambda _: self._asking.pop(key, None))
        return await asyncio.shield(asking)

    def forget(self, image_id: str) -> None:
        """Drop every remembered decision about an image."""
        for key in [k for k in self._allowed if k[1] == image_id]:
            del self._allowed[key]

    async def _ask(self, key: tuple[str, str] | None, image_id: str,
                   headers: Mapping[str, str]) -> ImageInfo:
        forwarded = end_to_end_headers(headers)
        for name in _DATA_ONLY_HEADERS:
            forwarded.popall(name, None)
        response = await self._upstream.request("GET", f"/v2/images/{image_id}", forwarded)
        try:
            body = await response.content.read(_MAX_METADATA_BYTES)
        except Exception as exc:
            raise self._upstream.broken(exc, "an image metadata GET") from exc
        finally:
            response.release()
        if response.status != 200:
            self._metrics.auth_checks.labels("denied").inc()
            raise Denied(response.status, end_to_end_headers(response.headers), body)
        try:
            info = image_info(image_id, json.loads(body))
        except (ValueError, AttributeError) as exc:
            raise UpstreamError(f"Glance's metadata of image {image_id} is not JSON") from exc
        self._metrics.auth_checks.labels("allowed").inc()
        if self.ttl > 0 and key is not None:
            if len(self._allowed) >= _MAX_DECISIONS:
                self._prune()
            self._allowed[key] = (time.monotonic() + self.ttl, info)
        return info

    def _prune(self) -> None:
        now = time.monotonic()
        for key in [k for k, (expires, _) in self._allowed.items() if expires <= now]:
            del self._allowed[key]
        while len(self._allowed) >= _MAX_DECISIONS:
            del self._allowed[next(iter(self._allowed))]
