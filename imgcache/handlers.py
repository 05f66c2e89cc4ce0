"""The request handlers: the image-data GET path, and the pass-through for everything else."""

from __future__ import annotations

import logging
import os
import random
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from imgcache.authorize import Authorizer, Denied, ImageInfo
from imgcache.errors import BadRequest, FillError, ImgcacheError, NoSpace
from imgcache.fill import Fill, FillFailed, FillRegistry
from imgcache.history import AccessHistory
from imgcache.keys import data_path, parse_image_id
from imgcache.metrics import Metrics
from imgcache.prefetch import Prefetcher
from imgcache.ranges import ByteRange, parse_range
from imgcache.responses import ZeroCopySender
from imgcache.store import Entry, Store
from imgcache.upstream import Upstream, end_to_end_headers
from imgcache.verify import Verifier

log = logging.getLogger("imgcache.access")

_DATA_PATH = re.compile(r"^/v2/images/([^/]+)/file$")
_PASS_CHUNK = 256 * 1024
REQUEST_ID_HEADER = "X-OpenStack-Request-ID"
#: Image statuses whose cached data must not be served any more.
GONE_STATUSES = frozenset({"deactivated", "deleted", "pending_delete", "killed"})


@dataclass
class Services:
    """What the handlers use; built and closed by ``app``."""

    upstream: Upstream
    authorizer: Authorizer
    store: Store
    fills: FillRegistry
    sender: ZeroCopySender
    metrics: Metrics
    prefetcher: Prefetcher
    verifier: Verifier
    history: AccessHistory


SERVICES = web.AppKey("services", Services)


async def dispatch(request: web.Request) -> web.StreamResponse:
    """Route image-data GETs to the cache, everything else to Glance untouched."""
    services = request.app[SERVICES]
    match = _DATA_PATH.match(request.path)
    try:
        if not request.raw_path.startswith("/"):
            raise BadRequest("the request target must be a path such as /v2/images "
                             "(absolute-form and asterisk-form targets are not proxied)")
        _refuse_undecodable(request)
        if request.method == "GET" and match:
            return await ImageDataRequest(services, request, match.group(1)).serve()
        return await pass_through(services, request)
    except ImgcacheError as exc:
        return error_response(exc)


def _refuse_undecodable(request: web.Request) -> None:
    """A header or target byte that is not UTF-8 could not be forwarded as it was sent
    (Glance would judge other credentials than the client's): refuse the request."""
    try:
        request.raw_path.encode()
        for name, value in request.raw_headers:
            name.decode()
            value.decode()
    except UnicodeError:
        raise BadRequest("the request holds bytes that are not UTF-8 in its target or "
                         "headers") from None


def error_response(exc: ImgcacheError) -> web.Response:
    """A short JSON error with the status the exception carries."""
    return web.Response(status=exc.status, body=exc.body(), content_type="application/json")


async def pass_through(services: Services, request: web.Request,
                       cache_status: str | None = None,
                       on_sent: Callable[[int], None] | None = None) -> web.StreamResponse:
    """Forward the request to Glance and stream the answer back, bodies never buffered
    whole. ``cache_status`` adds an X-Cache-Status header (BYPASS downloads, which are
    image data and so go through ``[upstream] proxy`` when one is set); ``on_sent`` counts
    the body bytes sent."""
    services.metrics.passthrough_requests.inc()
    body = request.content if request.body_exists else None
    upstream = await services.upstream.request(
        request.method, request.raw_path, request.headers, data=body,
        image_data=cache_status is not None)
    try:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        response.headers.extend(end_to_end_headers(upstream.headers))
        if cache_status:
            response.headers["X-Cache-Status"] = cache_status
        if upstream.content_length is not None:
            response.content_length = upstream.content_length
        await response.prepare(request)
        try:
            async for chunk in upstream.content.iter_chunked(_PASS_CHUNK):
                if cache_status:
                    services.metrics.upstream_bytes.inc(len(chunk))
                await response.write(chunk)
                if on_sent is not None:
                    on_sent(len(chunk))
        except ConnectionResetError:  # the client went away: routine, nothing to report
            log.debug("%s %s: the client went away mid-body", request.method, request.path)
            _abort(request)
            return response
        except Exception as exc:
            # The status line is gone: all that is left is not to end the body cleanly.
            log.warning("%s %s: %s; aborting the client connection", request.method,
                        request.path, services.upstream.broken(exc, "a pass-through"))
            _abort(request)
            return response
        await response.write_eof()
        return response
    finally:
        upstream.release()


def _abort(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.abort()


def _new_request_id() -> str:
    """An OpenStack-style ``req-<uuid4>``; from the process's PRNG, not os.urandom, since a
    request id needs to be unique, not secret, and this runs for every request."""
    return f"req-{uuid.UUID(int=random.getrandbits(128), version=4)}"


class ImageDataRequest:
    """One ``GET /v2/images/{id}/file``: authorize with Glance, then serve from the cache
    (HIT), from a fill in flight (MISS when this request started it, COALESCED when it
    joined), or straight from Glance (BYPASS)."""

    def __init__(self, services: Services, request: web.Request, raw_id: str) -> None:
        self.services = services
        self.request = request
        self.raw_id = raw_id
        self.request_id = (request.headers.get(REQUEST_ID_HEADER) or _new_request_id())[:128]
        self.result = "error"
        self.sent = 0
        self.status = 0  # 0 until answered; 499 when the client went away mid-body

    async def serve(self) -> web.StreamResponse:
        """Answer the request and log one line about it."""
        started = time.monotonic()
        try:
            response = await self._serve()
            self.status = self.status or response.status
            return response
        finally:
            metrics = self.services.metrics
            metrics.requests.labels(self.result).inc()
            metrics.served_bytes.labels(self.result).inc(self.sent)
            self.services.history.record(self.raw_id, self.result)
            fields = {"request_id": self.request_id, "image_id": self.raw_id[:64],
                      "result": self.result.upper(), "status": self.status,
                      "bytes": self.sent, "duration": round(time.monotonic() - started, 3)}
            log.info("image request %s image=%s result=%s status=%s bytes=%d "
                     "duration=%.3fs", *fields.values(), extra=fields)

    async def _finish_from_glance(self, response: web.StreamResponse, info: ImageInfo,
                                  position: int, end: int) -> web.StreamResponse:
        """The cache disk failed under a fill: send the rest of this response from Glance,
        streamed through, so that the client still gets its image."""
        assert info.expected is not None
        log.warning("request %s: cache disk failed during the fill of %s; sending bytes "
                    "%d-%d from Glance", self.request_id, info.image_id, position, end)

        async def forward(chunk: bytes) -> None:
            await response.write(chunk)
            self._count_sent(len(chunk))

        try:
            await self.services.fills.new_download().run(
                data_path(info.image_id), self.request.headers, info.expected.size, forward,
                start=position, end=end)
        except (ImgcacheError, FillError) as exc:
            log.warning("request %s: Glance failed too (%s); aborting", self.request_id, exc)
            self.result = "error"
            _abort(self.request)
            return response
        except ConnectionResetError:
            self.status = 499
            return response
        await response.write_eof()
        return response

    def _count_sent(self, count: int) -> None:
        self.sent += count

    async def _serve(self) -> web.StreamResponse:
        image_id = parse_image_id(self.raw_id)
        try:
            info = await self.services.authorizer.authorize(image_id, self.request.headers)
        except Denied as denied:
            self.result = "denied"
            denied.headers.popall("Content-Length", None)
            return web.Response(status=denied.status, headers=denied.headers,
                                body=denied.body)
        if info.status != "active" or info.expected is None:
            if info.status in GONE_STATUSES and self.services.store.remove(image_id):
                log.info("dropped cached image %s: Glance says it is %s", image_id,
                         info.status)
            # Glance answers these itself (204 without data, 403 deactivated...).
            self.result = "bypass"
            return await pass_through(self.services, self.request, "BYPASS", self._count_sent)
        if len(self.request.headers.getall("Range", [])) > 1:
            raise BadRequest("only one byte range per request is supported")
        byte_range = parse_range(self.request.headers.get("Range"), info.expected.size)
        for _ in range(3):  # an entry or fill can vanish between two looks
            entry = self.services.store.lookup(image_id, info.expected.key)
            if entry is not None:
                opened = await self.services.store.open_entry(entry)
                if opened is not None:
                    self.result = "hit"
                    try:
                        return await self._send(info, byte_range, opened.fd, entry)
                    finally:
                        self.services.store.close_entry(opened)
                continue
            try:
                joined = self.services.fills.join_or_start(
                    image_id, info.expected, data_path(image_id), self.request.headers)
            except NoSpace as exc:
                log.info("image %s not cached (%s); streaming it through", image_id, exc)
                self.result = "bypass"
                return await pass_through(self.services, self.request, "BYPASS",
                                          self._count_sent)
            if isinstance(joined, Entry):
                continue
            fill, started = joined
            fd = await fill.open_reader()
            if fd is not None:
                self.result = "miss" if started else "coalesced"
                try:
                    return await self._send(info, byte_range, fd, fill)
                finally:
                    os.close(fd)
        self.result = "bypass"
        return await pass_through(self.services, self.request, "BYPASS", self._count_sent)

    async def _send(self, info: ImageInfo, byte_range: ByteRange | None, fd: int,
                    source: Entry | Fill) -> web.StreamResponse:
        """Send the image (or its range) from ``fd``: a committed entry's file, or the
        file a fill is writing."""
        assert info.expected is not None
        size = info.expected.size
        start, end = (byte_range.start, byte_range.end) if byte_range else (0, size)
        response = web.StreamResponse(status=206 if byte_range else 200)
        response.headers["Content-Type"] = "application/octet-stream"
        if info.checksum:
            response.headers["Content-MD5"] = info.checksum
        if byte_range:
            response.headers["Content-Range"] = byte_range.content_range
        response.headers["X-Cache-Status"] = self.result.upper()
        response.headers["x-openstack-request-id"] = self.request_id
        response.content_length = end - start
        sender = self.services.sender
        try:
            await response.prepare(self.request)
            if isinstance(source, Entry):
                if not await sender.send_file(self.request, fd, start, end, size,
                                              self._count_sent):
                    self.services.store.drop_unusable(source, "its file was deleted")
            else:
                await sender.send_growing(self.request, fd, start, end, source,
                                          self._count_sent)
        except FillFailed as exc:
            if exc.outcome == "disk_error":
                return await self._finish_from_glance(response, info, start + self.sent, end)
            log.warning("request %s: fill of image %s failed (%s); aborting the client "
                        "connection so it cannot take a partial image for a whole one",
                        self.request_id, info.image_id, exc)
            self.result = "error"
            _abort(self.request)
            return response
        except ConnectionResetError:
            self.status = 499
            _abort(self.request)
            return response
        except OSError as exc:
            if not isinstance(source, Entry):
                raise
            self.services.store.drop_unusable(source, str(exc))
            self.result = "error"
            _abort(self.request)
            return response
        await response.write_eof()
        return response
