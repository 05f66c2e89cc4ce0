"""Glance decides who reads an image: every image-data GET is authorized by asking Glance the
question its ``download_image`` policy answers, with the caller's own headers.

Two requests go to Glance at once, both with the caller's headers:
- the image's metadata (``GET /v2/images/{id}``): size, hashes and status, judged by Glance's
  ``get_image`` policy (a refusal here, usually 404, is Glance's answer to the download too);
- a download check: a data GET for one byte (``Range: bytes=0-0``). Glance checks
  ``download_image`` (which is stricter: a project reader may see an image but not download
  it, and operators restrict downloads by image property) before it touches the store, so its
  answer is the download policy's. A store that cannot serve ranges (rbd, swift, s3) answers
  400 after that check; the check is then made without a Range, and the answer is cut off
  after its status line, as is a 200 to the ranged check.

Only "allowed" answers are remembered, per (credentials, image), for ``decision_ttl``;
credentials are kept as hashes only, and a caller who sent none is asked about every time.
``[auth] policy_check = metadata`` skips the download check (for clouds whose download policy
is no stricter than get_image); the default is ``download``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from multidict import CIMultiDict

from imgcache.credentials import DATA_REQUEST_HEADERS, credential_fingerprint
from imgcache.decisions import Decisions
from imgcache.digest import Expected, expected_from_metadata
from imgcache.errors import UpstreamError
from imgcache.keys import data_path
from imgcache.metrics import Metrics
from imgcache.upstream import Upstream, end_to_end_headers

log = logging.getLogger(__name__)

#: Values of ``[auth] policy_check``.
POLICY_CHECKS = ("download", "metadata")
_MAX_METADATA_BYTES = 4 << 20
_MAX_ERROR_BYTES = 64 << 10
#: Images remembered as stored where Glance cannot serve ranges (checked without a Range).
_MAX_RANGELESS_IMAGES = 10_000


@dataclass(frozen=True)
class ImageInfo:
    """What Glance said about an image to a caller it allowed to see it."""

    image_id: str
    status: str
    size: int | None
    checksum: str | None
    expected: Expected | None  # None when the image cannot be cached (no size)


class Denied(Exception):
    """Glance refused (or failed) a question about the caller; its answer goes back to the
    client as it was."""

    def __init__(self, status: int, headers: CIMultiDict[str], body: bytes) -> None:
        super().__init__(f"Glance answered {status}")
        self.status = status
        self.headers = headers
        self.body = body


def question_headers(headers: Mapping[str, str]) -> CIMultiDict[str]:
    """The caller's headers as sent on a question asked for it (every header kept, repeated
    ones included, but those that describe the client's own data request)."""
    forwarded = end_to_end_headers(headers)
    for name in DATA_REQUEST_HEADERS:
        forwarded.popall(name, None)
    return forwarded


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


class _Question:
    """One question in flight for a (credentials, image); concurrent identical callers share
    it. ``remember`` is cleared when the image is forgotten meanwhile: the answer may then be
    older than what made us forget it."""

    def __init__(self, task: asyncio.Future[ImageInfo]) -> None:
        self.task = task
        self.remember = True


class Authorizer:
    """Asks Glance whether a caller may download an image, reusing recent "allowed" answers."""

    def __init__(self, upstream: Upstream, ttl: float, metrics: Metrics,
                 policy_check: str = "download") -> None:
        assert policy_check in POLICY_CHECKS
        self._upstream = upstream
        self._metrics = metrics
        self._policy_check = policy_check
        self._decisions: Decisions[ImageInfo] = Decisions(ttl)
        self._asking: dict[tuple[str, str], _Question] = {}
        self._rangeless: OrderedDict[str, None] = OrderedDict()

    @property
    def ttl(self) -> float:
        """How long an "allowed" answer is reused."""
        return self._decisions.ttl

    def set_ttl(self, ttl: float) -> None:
        """Change the decision TTL (a reload); answers already kept expire within it."""
        self._decisions.set_ttl(ttl)

    def set_policy_check(self, policy_check: str) -> None:
        """Change which question is asked (a reload); a change forgets every answer kept,
        which was the answer to the other question."""
        assert policy_check in POLICY_CHECKS
        if policy_check != self._policy_check:
            self._decisions.clear()
            for question in self._asking.values():
                question.remember = False
        self._policy_check = policy_check

    async def authorize(self, image_id: str, headers: Mapping[str, str]) -> ImageInfo:
        """The image's metadata as this caller sees it, once Glance said the caller may
        download it (for an image that is not active, only that it may see it: its data
        request then goes to Glance as it is). Raises Denied with Glance's answer otherwise.
        Concurrent identical questions share one round of requests."""
        fingerprint = credential_fingerprint(headers)
        if fingerprint is None:
            return await self._ask(image_id, headers)
        remembered = self._decisions.get(fingerprint, image_id)
        if remembered is not None:
            self._metrics.count_auth_answer("allowed_cached")
            return remembered
        key = (fingerprint, image_id)
        question = self._asking.get(key)
        if question is None:
            question = _Question(asyncio.ensure_future(self._ask(image_id, headers)))
            self._asking[key] = question
            question.task.add_done_callback(lambda task: self._answered(key, question, task))
        return await asyncio.shield(question.task)

    def forget(self, image_id: str) -> None:
        """Drop every remembered answer about an image, and keep the answers of questions in
        flight about it from being remembered."""
        self._decisions.forget_image(image_id)
        for (_, asked_about), question in self._asking.items():
            if asked_about == image_id:
                question.remember = False

    def _answered(self, key: tuple[str, str], question: _Question,
                  task: asyncio.Future[ImageInfo]) -> None:
        if self._asking.get(key) is question:
            del self._asking[key]
        if question.remember and not task.cancelled() and task.exception() is None:
            self._decisions.remember(key[0], key[1], task.result())

    async def _ask(self, image_id: str, headers: Mapping[str, str]) -> ImageInfo:
        try:
            info = await self._ask_glance(image_id, question_headers(headers))
        except Denied:
            self._metrics.count_auth_answer("denied")
            raise
        self._metrics.count_auth_answer("allowed")
        return info

    async def _ask_glance(self, image_id: str, asked: CIMultiDict[str]) -> ImageInfo:
        if self._policy_check == "metadata":
            info = await self._metadata(image_id, asked)
        else:
            metadata, download = await asyncio.gather(
                self._metadata(image_id, asked), self._check_download(image_id, asked),
                return_exceptions=True)
            if isinstance(metadata, BaseException):
                raise metadata
            info = metadata
            # An image that is not active is not served from the cache: the caller's own
            # data request goes to Glance, which judges it (and says 403 for a deactivated
            # one, 204 for one without data).
            if info.status == "active" and isinstance(download, BaseException):
                raise download
        return info

    async def _metadata(self, image_id: str, asked: CIMultiDict[str]) -> ImageInfo:
        response = await self._upstream.request("GET", f"/v2/images/{image_id}", asked)
        try:
            limit = _MAX_METADATA_BYTES if response.status == 200 else _MAX_ERROR_BYTES
            body = await self._upstream.read_body(response, limit, "an image metadata GET")
        finally:
            response.release()
        if response.status != 200:
            raise _denied(response, body)
        try:
            return image_info(image_id, json.loads(body))
        except (ValueError, AttributeError) as exc:
            raise UpstreamError(f"Glance's metadata of image {image_id} is not JSON") from exc

    async def _check_download(self, image_id: str, asked: CIMultiDict[str]) -> None:
        """Raise Denied unless Glance would let this caller download the image."""
        ranged = image_id not in self._rangeless
        checked = CIMultiDict(asked)
        if ranged:
            checked["Range"] = "bytes=0-0"
        response = await self._upstream.request("GET", data_path(image_id), checked)
        try:
            if response.status in (200, 206):
                await self._end_allowed(response)
                return
            body = await self._upstream.read_body(response, _MAX_ERROR_BYTES,
                                                  "a download check")
        finally:
            response.release()
        if ranged and response.status in (400, 416):
            # Glance judges download_image before it asks the store for a range: this store
            # cannot do ranges. Ask again without one (and without one from now on).
            self._rangeless[image_id] = None
            while len(self._rangeless) > _MAX_RANGELESS_IMAGES:
                self._rangeless.popitem(last=False)
            log.info("Glance's store refuses ranges for image %s: its download check is "
                     "made without one, cut off after the status line", image_id)
            await self._check_download(image_id, asked)
            return
        raise _denied(response, body)

    async def _end_allowed(self, response: aiohttp.ClientResponse) -> None:
        """Read the one byte of a ranged answer (the connection goes back to the pool), or cut
        off an answer that would carry the whole image."""
        if response.status == 206 and response.content_length == 1:
            await self._upstream.read_body(response, 1, "a download check")
        else:
            response.close()


def _denied(response: aiohttp.ClientResponse, body: bytes) -> Denied:
    return Denied(response.status, end_to_end_headers(response.headers), body)
