"""The stand-in's server: `GlanceStandin`, its routes and handlers, the request log.

Handlers are methods, so a test can subclass the stand-in to change how one call is
answered (a token taken another way, metadata answered late).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import os
import pathlib
import socket
import ssl
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable

from aiohttp import web

from imgcache.standin.faults import Fault, send_range, take_fault
from imgcache.standin.images import (
    CHUNK,
    IMAGE_SCHEMA,
    Spool,
    StandinImage,
    file_chunks,
    now,
    pseudo_random_bytes,
    store_chunks,
)
from imgcache.standin.wire import (
    TALLY,
    LoggedRequest,
    Reject,
    Tally,
    add_request_id,
    consume,
    error,
    parse_range,
    run_blocking,
)

SHUTDOWN_TIMEOUT = 1.0
"""Seconds `stop()` waits for requests still in progress before cancelling them."""

KEYSTONE_URI = "http://127.0.0.1:5000"
"""The Keystone that the stand-in's 401 answers name (``WWW-Authenticate``)."""


class GlanceStandin:
    """A Glance v2 image API on loopback, with fault knobs, for testing imgcache against.

    Tests reach into `images`, `faults` and `tokens` directly and read `requests` afterwards.
    Images whose visibility is not public/community are visible only to their `owner_tokens`.
    """

    def __init__(
        self,
        data_dir: pathlib.Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tokens: Iterable[str] = ("token-a",),
        ssl_context: ssl.SSLContext | None = None,
        sock: socket.socket | None = None,
    ) -> None:
        self.data_dir = pathlib.Path(data_dir)
        self.sock = sock  # a listening socket to serve on instead of binding host:port
        self.ssl_context = ssl_context  # serve https with it (see `url`)
        self.host = host
        self.port = port
        self.tokens: set[str] = set(tokens)
        self.images: dict[str, StandinImage] = {}
        self.faults: dict[str, Fault] = {}
        # When set: image metadata is sent in two writes this many seconds apart, as a
        # reply split over TCP segments arrives on a real network.
        self.metadata_split_pause: float | None = None
        self.requests: list[LoggedRequest] = []
        self._data_gets: Counter[str] = Counter()
        self._download_checks: Counter[str] = Counter()
        self._runner: web.AppRunner | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start serving on `sock` if one was given (`host` then only names it in `url`), else
        on host:port; with port 0 a free port is picked (see `url`)."""
        app = web.Application(middlewares=[self._log_middleware], client_max_size=1 << 20)
        app.on_response_prepare.append(add_request_id)
        file_route = "/v2/images/{image_id}/file"
        app.router.add_get("/v2/images", self._list_images)
        app.router.add_post("/v2/images", self._create_image)
        app.router.add_get("/v2/images/{image_id}", self._show_image)
        app.router.add_delete("/v2/images/{image_id}", self._delete_image)
        app.router.add_get(file_route, self._download, allow_head=False)
        app.router.add_put(file_route, self._upload)
        app.router.add_get("/v2/schemas/image", self._image_schema)
        app.router.add_route("*", "/_standin/echo", self._echo)
        app.router.add_get("/_standin/stream", self._stream)
        self._runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=SHUTDOWN_TIMEOUT
        )
        await self._runner.setup()
        site: web.BaseSite
        if self.sock is not None:
            site = web.SockSite(self._runner, self.sock, ssl_context=self.ssl_context)
        else:
            site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self.ssl_context)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        """Stop serving; requests still running after SHUTDOWN_TIMEOUT are cancelled."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:9292`` (valid once started)."""
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{self.host}:{self.port}"

    # -- test helpers ------------------------------------------------------------------------

    async def add_image(
        self,
        data: bytes | None = None,
        *,
        path: pathlib.Path | None = None,
        size: int | None = None,
        image_id: str | None = None,
        owner_tokens: Iterable[str] | None = None,
        visibility: str = "private",
        status: str = "active",
        properties: dict[str, str] | None = None,
        hash_algo: str | None = "sha512",
        checksum: bool = True,
    ) -> StandinImage:
        """Add an image from exactly one of `data`, `path` (used in place) or `size`.

        With `size`, that many bytes of `pseudo_random_bytes(image_id, size)` are written to a
        file under data_dir. Writing and hashing run in a thread. `hash_algo=None` leaves
        os_hash_algo/os_hash_value null (like a location-API image); `checksum=False` leaves
        the md5 checksum null. `owner_tokens` defaults to all of the stand-in's tokens.
        `properties` are custom image properties, reported beside the standard ones.
        """
        if sum(x is not None for x in (data, path, size)) != 1:
            raise ValueError("give exactly one of data, path or size")
        image_id = image_id or str(uuid.uuid4())
        stored = pathlib.Path(path) if path is not None else self.data_dir / f"{image_id}.img"
        target = None if path is not None else stored
        chunks: Iterable[bytes]
        if data is not None:
            view = memoryview(data)
            chunks = (view[i : i + CHUNK] for i in range(0, len(data), CHUNK))
        elif path is not None:
            chunks = file_chunks(path)
        else:
            assert size is not None
            chunks = pseudo_random_bytes(image_id, size)
        real_size, md5, digest = await run_blocking(store_chunks, chunks, target, hash_algo)
        image = StandinImage(
            id=image_id,
            path=stored,
            size=real_size,
            checksum=md5 if checksum else None,
            os_hash_algo=hash_algo,
            os_hash_value=digest,
            status=status,
            visibility=visibility,
            owner_tokens=set(self.tokens if owner_tokens is None else owner_tokens),
            properties=dict(properties or {}),
        )
        self.images[image_id] = image
        return image

    def data_gets(self, image_id: str) -> int:
        """Return how many `GET /v2/images/{image_id}/file` requests have arrived, other than
        one-byte download checks (see `download_checks`)."""
        return self._data_gets[image_id]

    def download_checks(self, image_id: str) -> int:
        """Return how many data GETs for the first byte only (``Range: bytes=0-0``, which
        imgcache sends to ask the download policy) have arrived."""
        return self._download_checks[image_id]

    # -- plumbing ----------------------------------------------------------------------------

    @web.middleware
    async def _log_middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Turn rejections into JSON errors and log every request when its response ends."""
        tally = Tally()
        request[TALLY] = tally
        response: web.StreamResponse | None = None
        try:
            try:
                response = await handler(request)
            except Reject as reject:
                response = reject.response
            except web.HTTPException as exc:  # from the router: unknown path, bad method
                headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
                response = error(exc.status, exc.reason, headers)
            return response
        finally:
            if response is not None and not response.prepared:
                body = getattr(response, "body", None)
                sendable = isinstance(body, bytes) and request.method != "HEAD"
                tally.sent = len(body) if sendable else 0
            status = response.status if response is not None else tally.status or 500
            self.requests.append(
                LoggedRequest(
                    method=request.method,
                    path=request.path,
                    query_string=request.query_string,
                    headers=dict(request.headers),
                    status=status,
                    body_bytes_sent=tally.sent,
                    body_bytes_received=tally.received,
                    header_items=list(request.headers.items()),
                )
            )

    def _token(self, request: web.Request) -> str:
        """Return the request's valid token, or reject with Keystone's 401."""
        token = request.headers.get("X-Auth-Token")
        if token is None or token not in self.tokens:
            raise Reject(
                error(
                    401,
                    "The request you have made requires authentication.",
                    {"WWW-Authenticate": f'Keystone uri="{KEYSTONE_URI}"'},
                )
            )
        return token

    def _visible(self, image: StandinImage, token: str) -> bool:
        return image.status != "deleted" and (
            image.visibility in ("public", "community")
            or token in image.owner_tokens
            or token in image.reader_tokens
        )

    def _image(self, request: web.Request) -> tuple[StandinImage, str]:
        """Return the image named in the path and the token, or reject (401, or 404 for
        an image that does not exist, is deleted, or that the token may not see)."""
        token = self._token(request)
        image_id = request.match_info["image_id"]
        image = self.images.get(image_id)
        if image is None or not self._visible(image, token):
            raise Reject(error(404, f"No image found with ID {image_id}"))
        return image, token

    # -- handlers ----------------------------------------------------------------------------

    async def _list_images(self, request: web.Request) -> web.Response:
        token = self._token(request)
        docs = [
            image.doc()
            for image in self.images.values()
            if self._visible(image, token)
            and (image.visibility != "community" or token in image.owner_tokens)
        ]
        return web.json_response(
            {"images": docs, "schema": "/v2/schemas/images", "first": "/v2/images"}
        )

    async def _show_image(self, request: web.Request) -> web.StreamResponse:
        image, _ = self._image(request)
        if self.metadata_split_pause is None:
            return web.json_response(image.doc())
        body = json.dumps(image.doc()).encode()
        response = web.StreamResponse()
        response.content_type = "application/json"
        response.content_length = len(body)
        request[TALLY].status = 200
        await response.prepare(request)
        await response.write(body[: len(body) // 2])
        await asyncio.sleep(self.metadata_split_pause)
        await response.write(body[len(body) // 2 :])
        await response.write_eof()
        return response

    async def _create_image(self, request: web.Request) -> web.Response:
        token = self._token(request)
        raw = await request.read()
        request[TALLY].received = len(raw)
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            raise Reject(error(400, "Malformed JSON in request body.")) from None
        if not isinstance(body, dict):
            raise Reject(error(400, "The request body must be a JSON object."))
        image_id = str(body.get("id") or uuid.uuid4())
        if image_id in self.images:
            raise Reject(error(409, f"Image with identifier {image_id} already exists!"))
        visibility = body.get("visibility", "shared")
        if visibility not in ("public", "private", "shared", "community"):
            raise Reject(error(400, f"Invalid visibility value: {visibility}"))
        image = StandinImage(
            id=image_id,
            path=None,
            size=None,
            checksum=None,
            os_hash_algo=None,
            os_hash_value=None,
            status="queued",
            visibility=visibility,
            owner_tokens={token},
            name=str(body.get("name") or ""),
        )
        self.images[image_id] = image
        return web.json_response(image.doc(), status=201)

    async def _delete_image(self, request: web.Request) -> web.Response:
        image, token = self._image(request)
        if token not in image.owner_tokens:
            raise Reject(error(403, "You are not permitted to delete this image."))
        image.status = "deleted"
        image.updated_at = now()
        return web.Response(status=204)

    async def _image_schema(self, request: web.Request) -> web.Response:
        self._token(request)
        return web.json_response(IMAGE_SCHEMA)

    async def _download(self, request: web.Request) -> web.StreamResponse:
        is_check = request.headers.get("Range") == "bytes=0-0"
        (self._download_checks if is_check else self._data_gets)[
            request.match_info["image_id"]] += 1
        image, token = self._image(request)
        if image.status == "deactivated":
            raise Reject(error(403, "The requested image has been deactivated."))
        if token in image.reader_tokens and token not in image.owner_tokens:
            raise Reject(error(403, "You are not authorized to download this image."))
        if image.status != "active" or image.path is None or image.size is None:
            return web.Response(status=204)
        fault = take_fault(self.faults, image.id, is_check)
        if fault.first_byte_delay:
            await asyncio.sleep(fault.first_byte_delay)
        if fault.status is not None:
            raise Reject(error(fault.status, "Fault injected by the Glance stand-in."))
        first, last, status = 0, image.size - 1, 200
        range_header = request.headers.get("Range")
        if range_header is not None and not fault.ignore_range:
            if not fault.ranges_supported:
                raise Reject(error(400, "Range requests are not supported by this store."))
            first, last = parse_range(range_header, image.size)
            status = 206
        response = web.StreamResponse(status=status)
        response.headers["Content-Type"] = "application/octet-stream"
        if image.checksum:
            response.headers["Content-MD5"] = image.checksum
        if status == 206:
            response.headers["Content-Range"] = f"bytes {first}-{last}/{image.size}"
        if fault.chunked:
            response.enable_chunked_encoding()
        else:
            response.content_length = last - first + 1
        tally = request[TALLY]
        tally.status = status
        await response.prepare(request)
        fd = await run_blocking(os.open, image.path, os.O_RDONLY)
        try:
            complete = await send_range(request, response, fd, first, last, fault, tally)
        finally:
            await run_blocking(os.close, fd)
        if complete:
            await response.write_eof()
        return response

    async def _upload(self, request: web.Request) -> web.Response:
        image, token = self._image(request)
        if token not in image.owner_tokens:
            raise Reject(error(403, "You are not permitted to upload data for this image."))
        if image.status != "queued":
            message = f"Image status transition from {image.status} to saving is not allowed"
            raise Reject(error(409, message))
        if request.content_type != "application/octet-stream":
            raise Reject(error(415, "Content-Type must be application/octet-stream."))
        image.status = "saving"
        spool = Spool(self.data_dir / f"{image.id}.img")
        # One thread per upload: writes, finish and discard run in order even when this
        # handler is cancelled mid-write (client gone, server stopping).
        writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="standin-upload")
        try:
            size = await consume(request, spool.write, request[TALLY], writer)
            await asyncio.get_running_loop().run_in_executor(writer, spool.finish)
        except BaseException:
            image.status = "queued"
            writer.submit(spool.discard)
            raise
        finally:
            writer.shutdown(wait=False)
        image.path, image.size, image.checksum = spool.path, size, spool.md5.hexdigest()
        image.os_hash_algo, image.os_hash_value = "sha512", spool.sha512.hexdigest()
        image.status, image.updated_at = "active", now()
        return web.Response(status=204)

    async def _echo(self, request: web.Request) -> web.Response:
        sha256 = hashlib.sha256()
        size = await consume(request, sha256.update, request[TALLY])
        return web.json_response(
            {
                "method": request.method,
                "path_qs": request.raw_path,
                "headers": dict(request.headers),
                "body_bytes": size,
                "body_sha256": sha256.hexdigest(),
            }
        )

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        try:
            size = int(request.query["size"])
            if size < 0:
                raise ValueError(size)
        except (KeyError, ValueError):
            raise Reject(error(400, "size=N (bytes, >= 0) is required.")) from None
        response = web.StreamResponse()
        response.headers["Content-Type"] = "application/octet-stream"
        response.content_length = size
        tally = request[TALLY]
        tally.status = 200
        await response.prepare(request)
        chunks = pseudo_random_bytes(request.query.get("seed", "stream"), size)
        while chunk := await run_blocking(next, chunks, b""):
            await response.write(chunk)
            tally.sent += len(chunk)
        await response.write_eof()
        return response
