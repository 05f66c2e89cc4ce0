"""The request handlers: the image-data GET path (authorize, choose the source, send), and
the pass-through for everything else."""

from __future__ import annotations

import logging
import os
import random
import re
import time
import uuid
from concurrent.futures import Executor
from dataclasses import dataclass

from aiohttp import web
from multidict import CIMultiDict

from imgcache.authorize import Authorizer, Denied, ImageInfo, question_headers
from imgcache.credentials import AllowedCallers
from imgcache.digest import Expected, hash_fd
from imgcache.errors import BadRequest, FillError, ImgcacheError, UpstreamError
from imgcache.fill import FillFailed, FillRegistry
from imgcache.history import AccessHistory
from imgcache.keys import parse_image_id
from imgcache.logs import log_safe
from imgcache.metrics import Metrics
from imgcache.openfiles import OpenFiles
from imgcache.passthrough import forward, pass_through, relay
from imgcache.prefetch import Prefetcher
from imgcache.ranges import ByteRange, requested_range
from imgcache.responses import ClientGone, FileSender, reset_connection
from imgcache.sources import CachedFile, GrowingFile, open_source
from imgcache.store import Store
from imgcache.threads import run_to_completion
from imgcache.transfer import GlanceRefused
from imgcache.upstream import Upstream
from imgcache.verified_stream import VerifiedStream
from imgcache.verify import Verifier

log = logging.getLogger("imgcache.access")

_DATA_PATH = re.compile(r"^/v2/images/([^/]+)/file$")
REQUEST_ID_HEADER = "X-OpenStack-Request-ID"
#: A client's request id is kept only if it is a token like OpenStack's ``req-<uuid>``; one
#: with spaces or quotes could forge the fields of the plain access-log line.
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
#: Statuses that end an image's cached life. A deleted image is never among them: Glance
#: answers 404 for it, as for an image the caller may not see.
GONE_STATUSES = frozenset({"deactivated", "killed"})


@dataclass
class Services:
    """What the handlers use; built and closed by ``app``."""

    upstream: Upstream
    authorizer: Authorizer
    store: Store
    open_files: OpenFiles
    fills: FillRegistry
    sender: FileSender
    metrics: Metrics
    prefetcher: Prefetcher
    verifier: Verifier
    pipeline: Executor
    history: AccessHistory


SERVICES = web.AppKey("services", Services)


async def dispatch(request: web.Request) -> web.StreamResponse:
    """Route image-data GETs to the cache, everything else to Glance untouched."""
    services = request.app[SERVICES]
    match = _DATA_PATH.match(request.path)
    if request.method == "GET" and match:
        return await ImageDataRequest(services, request, match.group(1)).serve()
    try:
        _refuse_bad_targets(request)
        return await pass_through(services.upstream, services.metrics, request)
    except ImgcacheError as exc:
        return error_response(exc)


def _refuse_bad_targets(request: web.Request) -> None:
    """Refuse what cannot be forwarded as it was sent: a target that is not a path, and
    header or target bytes that are not UTF-8 (Glance would judge other credentials than
    the client's)."""
    if not request.raw_path.startswith("/"):
        raise BadRequest("the request target must be a path such as /v2/images "
                         "(absolute-form and asterisk-form targets are not proxied)")
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


def glance_answer(status: int, headers: CIMultiDict[str], body: bytes) -> web.Response:
    """Glance's own (refusing) answer, sent on as it was."""
    headers = CIMultiDict(headers)
    headers.popall("Content-Length", None)
    return web.Response(status=status, headers=headers, body=body)


def _request_id(request: web.Request) -> str:
    """The client's request id if it is a plain token, else a new one."""
    given = request.headers.get(REQUEST_ID_HEADER)
    if given is not None and _CLIENT_REQUEST_ID.fullmatch(given):
        return given
    return _new_request_id()


def _new_request_id() -> str:
    """An OpenStack-style ``req-<uuid4>``; from the process's PRNG, not os.urandom, since a
    request id needs to be unique, not secret, and this runs for every request."""
    return f"req-{uuid.UUID(int=random.getrandbits(128), version=4)}"


class ImageDataRequest:
    """One ``GET /v2/images/{id}/file``: authorize with Glance, choose where the bytes come
    from (the cache: HIT; a fill: MISS when this request started it, COALESCED when it joined
    it; Glance: BYPASS), and send them. Every response that fails after its headers ends
    with a reset."""

    def __init__(self, services: Services, request: web.Request, raw_id: str) -> None:
        self.services = services
        self.request = request
        self.raw_id = raw_id
        self.request_id = _request_id(request)
        self.result = "error"
        self.sent = 0
        self.status = 0  # 0 until answered; 499 when the client went away mid-body
        self._image_answer: web.StreamResponse | None = None  # once its headers are built
        self._info: ImageInfo | None = None  # what Glance said, once it allowed the caller

    async def serve(self) -> web.StreamResponse:
        """Answer the request and log one line about it."""
        started = time.monotonic()
        try:
            try:
                _refuse_bad_targets(self.request)
                response = await self._serve()
            except ImgcacheError as exc:
                if self._headers_sent():
                    self._reset_unexpectedly()
                    raise
                self.result = "error"
                response = error_response(exc)
            except BaseException:
                if self._headers_sent():  # never a clean end of what was sent
                    self._reset_unexpectedly()
                raise
            self.status = self.status or response.status
            return response
        finally:
            self.services.metrics.count_request(self.result, self.sent)
            info = self._info
            if info is not None and info.status == "active" and info.expected is not None:
                self.services.history.record(info.image_id, info.expected.size, self.result)
            if log.isEnabledFor(logging.INFO):
                fields = {"request_id": self.request_id, "image_id": log_safe(self.raw_id[:64]),
                          "result": self.result.upper(), "status": self.status,
                          "bytes": self.sent, "duration": round(time.monotonic() - started, 3)}
                log.info("image request %s image=%s result=%s status=%s bytes=%d "
                         "duration=%.3fs", *fields.values(), extra=fields)

    async def _serve(self) -> web.StreamResponse:
        services = self.services
        image_id = parse_image_id(self.raw_id)
        try:
            info = await services.authorizer.authorize(image_id, self.request.headers)
        except Denied as denied:
            self.result = "denied"
            return glance_answer(denied.status, denied.headers, denied.body)
        self._info = info
        if info.status != "active" or info.expected is None:
            self._drop_if_gone(info)
            # Glance answers these itself (204 without data, 403 deactivated...).
            self.result = "bypass"
            return await pass_through(services.upstream, services.metrics, self.request,
                                      "BYPASS", self._count_sent)
        byte_range = requested_range(self.request.headers, info.expected.size)
        source = await open_source(services.store, services.open_files, services.fills,
                                   image_id, info.expected, self.request.headers)
        if isinstance(source, CachedFile):
            self.result = "hit"
            try:
                return await self._send_cached(info, byte_range, source)
            finally:
                services.open_files.release(source.handle)
        if isinstance(source, GrowingFile):
            self.result = "miss" if source.started else "coalesced"
            try:
                return await self._send_growing(info, byte_range, source)
            finally:
                os.close(source.fd)
        log.info("image %s not cached (%s); streaming it from Glance", image_id,
                 source.reason)
        self.result = "bypass"
        return await self._send_from_glance(info, byte_range)

    # -- the three sources ----------------------------------------------------------------

    async def _send_cached(self, info: ImageInfo, byte_range: ByteRange | None,
                           source: CachedFile) -> web.StreamResponse:
        assert info.expected is not None
        start, end = _span(byte_range, info.expected.size)
        response = await self._prepare(info, byte_range)
        try:
            linked = await self.services.sender.send_file(
                self.request, source.handle.fd, start, end, info.expected.size,
                self._count_sent)
        except ClientGone:
            return self._client_gone(response)
        except OSError as exc:
            self._drop_unusable(source, str(exc))
            return self._reset(response, f"its cached file cannot be read as committed ({exc})")
        if not linked:
            self._drop_unusable(source, "its file was deleted")
        await response.write_eof()
        return response

    async def _send_growing(self, info: ImageInfo, byte_range: ByteRange | None,
                            source: GrowingFile) -> web.StreamResponse:
        assert info.expected is not None
        try:
            await source.fill.wait_streaming()
        except FillFailed as failed:
            if failed.outcome == "disk_error":
                return await self._send_from_glance(info, byte_range)
            return self._answer_failed_fill(failed)
        start, end = _span(byte_range, info.expected.size)
        response = await self._prepare(info, byte_range)
        try:
            await self.services.sender.send_growing(self.request, source.fd, start, end,
                                                    source.fill, self._count_sent)
        except FillFailed as failed:
            if failed.outcome == "disk_error" and byte_range is None:
                return await self._finish_from_glance(response, info, source.fd)
            return self._reset(response, f"the fill failed ({failed})")
        except ClientGone:
            return self._client_gone(response)
        except OSError as exc:
            return self._reset(response, f"its file cannot be read ({exc})")
        await response.write_eof()
        return response

    async def _send_from_glance(self, info: ImageInfo,
                                byte_range: ByteRange | None) -> web.StreamResponse:
        """Not from the cache. A whole image is streamed from Glance and verified on its way
        (hashed, its tail held back); a range is Glance's own 206, passed through (a range
        cannot be checked against the image's hash without reading the whole image). A store
        that answers a range with the whole image gets the whole-image path: verified."""
        if byte_range is not None:
            services = self.services
            answer = await forward(services.upstream, services.metrics, self.request,
                                   image_data=True)
            if answer.status != 200:
                return await relay(services.upstream, services.metrics, self.request, answer,
                                   "BYPASS", self._count_sent)
            answer.close()  # its body is not wanted: not read to reuse the connection
            log.info("image %s: Glance answered a range with the whole image; streaming "
                     "the whole image, verified", info.image_id)
        assert info.expected is not None
        response = self._image_response(info, None)

        async def send(piece: memoryview) -> None:
            if not response.prepared:
                await response.prepare(self.request)
            await response.write(piece)
            self._count_sent(len(piece))

        try:
            await self._verified_stream(info.image_id, info.expected).run(
                send, send_from=0, send_to=info.expected.size)
        except (FillError, UpstreamError) as exc:
            if not response.prepared:
                return self._answer_before_any_byte(exc)
            return self._reset(response, f"streaming it from Glance failed ({exc})")
        except ClientGone:
            return self._client_gone(response)
        if not response.prepared:
            await response.prepare(self.request)
        await response.write_eof()
        return response

    async def _finish_from_glance(self, response: web.StreamResponse, info: ImageInfo,
                                  fd: int) -> web.StreamResponse:
        """The cache disk failed under the fill this whole-image response was reading: send
        the rest from Glance, verifying the whole response (the bytes already sent, hashed
        again from the fill's file, and the rest as it comes), its tail held back."""
        assert info.expected is not None
        position = self.sent
        log.warning("request %s: cache disk failed during the fill of %s; sending the rest "
                    "(from byte %d) from Glance", self.request_id, info.image_id, position)
        hasher = info.expected.new_hasher()
        try:
            reread = await run_to_completion(self.services.pipeline, hash_fd, fd, hasher,
                                             position)
        except OSError as exc:
            return self._reset(response, f"the bytes already sent cannot be read again to "
                                         f"verify them ({exc})")
        if reread != position:
            return self._reset(response, "the bytes already sent cannot be read again to "
                                         "verify them")

        async def send(piece: memoryview) -> None:
            await response.write(piece)
            self._count_sent(len(piece))

        try:
            await self._verified_stream(info.image_id, info.expected).run(
                send, send_from=position, send_to=info.expected.size, image_from=position,
                hasher=hasher)
        except (FillError, UpstreamError) as exc:
            return self._reset(response, f"Glance failed too ({exc})")
        except ClientGone:
            return self._client_gone(response)
        await response.write_eof()
        return response

    # -- helpers --------------------------------------------------------------------------

    def _verified_stream(self, image_id: str, expected: Expected) -> VerifiedStream:
        callers = AllowedCallers(question_headers(self.request.headers))
        return VerifiedStream(self.services.fills.new_download(), self.services.pipeline,
                              self.services.metrics, image_id, expected, callers)

    def _headers_sent(self) -> bool:
        return self._image_answer is not None and self._image_answer.prepared

    def _reset_unexpectedly(self) -> None:
        self.result = "error"
        reset_connection(self.request)

    def _image_response(self, info: ImageInfo,
                        byte_range: ByteRange | None) -> web.StreamResponse:
        """Glance's headers for this image's data, plus X-Cache-Status."""
        assert info.expected is not None
        start, end = _span(byte_range, info.expected.size)
        response = web.StreamResponse(status=206 if byte_range else 200)
        response.headers["Content-Type"] = "application/octet-stream"
        if info.checksum:
            response.headers["Content-MD5"] = info.checksum
        if byte_range:
            response.headers["Content-Range"] = byte_range.content_range
        response.headers["X-Cache-Status"] = self.result.upper()
        response.headers["x-openstack-request-id"] = self.request_id
        response.content_length = end - start
        self._image_answer = response
        return response

    async def _prepare(self, info: ImageInfo,
                       byte_range: ByteRange | None) -> web.StreamResponse:
        response = self._image_response(info, byte_range)
        await response.prepare(self.request)
        return response

    def _answer_failed_fill(self, failed: FillFailed) -> web.Response:
        """The fill failed before this request answered: say so with a status, not a 200."""
        self.result = "error"
        log.warning("request %s: the fill failed before any byte (%s)", self.request_id,
                    failed)
        if failed.refusal is not None:
            refusal = failed.refusal
            return glance_answer(refusal.status, refusal.headers, refusal.body)
        return error_response(ImgcacheError(str(failed), status=failed.status))

    def _answer_before_any_byte(self, exc: FillError | UpstreamError) -> web.Response:
        self.result = "error"
        log.warning("request %s: streaming from Glance failed before any byte (%s)",
                    self.request_id, exc)
        if isinstance(exc, GlanceRefused):
            return glance_answer(exc.status, exc.headers, exc.body)
        if isinstance(exc, UpstreamError):
            return error_response(exc)
        return error_response(UpstreamError(str(exc)))

    def _reset(self, response: web.StreamResponse, reason: str) -> web.StreamResponse:
        log.warning("request %s: image %s: %s; resetting the client connection so that it "
                    "cannot take a partial image for a whole one", self.request_id,
                    self.raw_id[:64], reason)
        self.result = "error"
        reset_connection(self.request)
        return response

    def _client_gone(self, response: web.StreamResponse) -> web.StreamResponse:
        self.status = 499
        reset_connection(self.request)
        return response

    def _drop_unusable(self, source: CachedFile, reason: str) -> None:
        """The cached file cannot be read as committed: drop its entry, and never hand out
        its fd again (also when the entry already left the cache)."""
        self.services.store.drop_unusable(source.entry, reason)
        self.services.open_files.retire(source.entry.file_name)

    def _drop_if_gone(self, info: ImageInfo) -> None:
        if info.status not in GONE_STATUSES:
            return
        self.services.authorizer.forget(info.image_id)
        if self.services.store.remove(info.image_id):
            log.info("dropped cached image %s: Glance says it is %s", info.image_id,
                     info.status)

    def _count_sent(self, count: int) -> None:
        self.sent += count


def _span(byte_range: ByteRange | None, size: int) -> tuple[int, int]:
    return (byte_range.start, byte_range.end) if byte_range else (0, size)

