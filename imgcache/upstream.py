"""The only module that talks to Glance: one aiohttp ClientSession, timeouts fit for
multi-GB downloads, fail-over across the configured URLs, TLS to https Glance, an optional
HTTP proxy for image-data downloads, and aiohttp's exceptions translated into errors that
carry the status a client should see."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from imgcache.config import Settings
from imgcache.datafetch import DataClient, DataResponse
from imgcache.errors import ConfigError, UpstreamError, UpstreamTimeout, UpstreamUnavailable
from imgcache.metrics import Metrics
from imgcache.upstream_failures import Failure, from_aiohttp, from_datafetch

log = logging.getLogger(__name__)

T = TypeVar("T")
#: Translates an exception of one request to one upstream URL (see ``upstream_failures``).
Translate = Callable[[Exception, str, "str | None"], "Failure | None"]

#: Headers that describe one connection, not the message (RFC 9110 section 7.6.1); never
#: forwarded in either direction. Host is set by the client for the upstream it talks to.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "trailers", "transfer-encoding", "upgrade", "host",
})

#: Headers that frame a request's body (Content-Length, Transfer-Encoding is hop-by-hop).
BODY_FRAMING = ("Content-Length", "Transfer-Encoding")

#: Headers aiohttp's client would otherwise add on its own; a pass-through adds nothing.
_NO_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


def end_to_end_headers(headers: Mapping[str, str]) -> CIMultiDict[str]:
    """Copy ``headers`` without hop-by-hop ones, including any the Connection header names
    (header names compared without regard to case, repeated headers all kept)."""
    items = list(headers.items())
    named = {
        token.strip().lower()
        for name, value in items if name.lower() == "connection"
        for token in value.split(",")
    }
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in items:
        lower = name.lower()
        if lower not in HOP_BY_HOP and lower not in named:
            out.add(name, value)
    return out


def upstream_headers(headers: Mapping[str, str], *, with_body: bool) -> CIMultiDict[str]:
    """The end-to-end headers of a request as sent on to Glance. ``Expect`` never goes on
    (imgcache answered it itself); a request sent without a body carries none of the
    client's framing headers, or Glance would wait for a body that never comes and read the
    next request on the pooled connection as its rest."""
    out = end_to_end_headers(headers)
    out.popall("Expect", None)
    if not with_body:
        for name in BODY_FRAMING:
            out.popall(name, None)
    return out


def _no_password() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key's
    # passphrase and hang a service; an empty one makes loading fail with an error instead.
    return b""


def tls_context(settings: Settings) -> ssl.SSLContext:
    """The TLS context for https Glance URLs, from ``[upstream] ca_file``, ``cert_file``,
    ``key_file`` and ``insecure``. Blocking (it reads files): call it off the event loop,
    once at start-up. Raises ConfigError naming the key of a missing or bad file."""

    def fail(key: str, path: object, problem: object) -> ConfigError:
        return ConfigError(f"[upstream] {key} {path}: {problem}")

    for key in ("ca_file", "cert_file", "key_file"):
        path = getattr(settings, key)
        if path is not None:
            try:
                path.open("rb").close()
            except OSError as exc:
                raise fail(key, path, f"cannot read it: {exc.strerror}") from exc
    try:
        context = ssl.create_default_context(
            cafile=str(settings.ca_file) if settings.ca_file else None)
    except ssl.SSLError as exc:
        raise fail("ca_file", settings.ca_file, f"no usable PEM CA certificate ({exc})") from exc
    if settings.cert_file is not None:
        try:
            context.load_cert_chain(settings.cert_file, settings.key_file, _no_password)
        except ssl.SSLError as exc:
            key_name = "cert_file/key_file" if settings.key_file else "cert_file"
            raise fail(key_name, settings.cert_file,
                       f"cannot load the client certificate and its unencrypted key "
                       f"({exc})") from exc
    if settings.insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        log.warning("[upstream] insecure = true: Glance's https certificates are NOT "
                    "verified; anyone on the path can impersonate Glance")
    return context


async def read_whole(response: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """A small answer's whole body, however many segments it arrives in; None when it is
    longer than ``limit`` bytes (reading stops there)."""
    body = bytearray()
    while chunk := await response.content.read(limit + 1 - len(body)):
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


class Upstream:
    """A pool of connections to Glance, tried in the configured order. Image-data GETs go
    through ``proxy`` when one is set; everything else, authorization included, goes to
    Glance directly."""

    def __init__(self, urls: tuple[str, ...], *, connect_timeout: float, read_timeout: float,
                 metrics: Metrics, proxy: str | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.urls = urls
        self.proxy = proxy
        self._ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
        self._metrics = metrics
        # No total timeout: a 20 GB image may take many minutes. Silence is what times out.
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=connect_timeout, sock_read=read_timeout)
        self._session: aiohttp.ClientSession | None = None
        self._data = DataClient(connect_timeout=connect_timeout, read_timeout=read_timeout,
                                ssl_context=ssl_context, proxy=proxy)

    async def start(self) -> None:
        """Open the client session (call from the running loop)."""
        self._session = aiohttp.ClientSession(
            timeout=self._timeout,
            auto_decompress=False,
            read_bufsize=2 << 20,
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=60, ssl=self._ssl),
            skip_auto_headers=_NO_AUTO_HEADERS,
            trust_env=False,
        )

    async def close(self) -> None:
        """Close every upstream connection."""
        if self._session is not None:
            await self._session.close()

    async def request(self, method: str, path_qs: str, headers: Mapping[str, str],
                      data: Any = None, rotate: int = 0,
                      image_data: bool = False) -> aiohttp.ClientResponse:
        """Send a request to the first upstream that accepts the connection; the caller
        must release the response. ``path_qs`` is the raw (still percent-encoded) path
        and query. Connection and TLS failures move on to the next URL (nothing was sent
        yet); other failures raise an UpstreamError subclass. ``rotate`` starts the round
        at another URL (a retry goes to the next upstream first). ``image_data`` marks an
        image-data GET: it goes through the configured proxy, if any."""
        session = self._session
        assert session is not None, "Upstream.start() was not called"
        proxy = self.proxy if image_data else None

        async def send(base: str) -> aiohttp.ClientResponse:
            return await session.request(
                method, URL(base + path_qs, encoded=True),
                headers=upstream_headers(headers, with_body=data is not None), data=data,
                allow_redirects=False, compress=None, chunked=None, proxy=proxy,
            )

        return await self._first_accepting(rotate, send, from_aiohttp, proxy)

    async def open_data(self, path_qs: str, headers: Mapping[str, str],
                        rotate: int = 0) -> DataResponse:
        """Send an image-data GET (through the configured proxy, if any) to the first
        upstream that accepts the connection, as ``request`` does, on a connection of its
        own whose body is received into reused buffers (``datafetch``); the caller must
        release the response. Raises UpstreamError subclasses with the same statuses and
        messages as ``request``."""

        async def send(base: str) -> DataResponse:
            return await self._data.get(base + path_qs,
                                        upstream_headers(headers, with_body=False))

        return await self._first_accepting(rotate, send, from_datafetch, self.proxy)

    async def _first_accepting(self, rotate: int, send: Callable[[str], Awaitable[T]],
                               translate: Translate, proxy: str | None) -> T:
        """``send(base)`` to each upstream URL in turn, from the ``rotate``-th, until one
        accepts the connection; failures are counted and translated by ``translate``."""
        failure: UpstreamError = UpstreamUnavailable("no upstream configured")
        start = rotate % len(self.urls) if self.urls else 0
        for base in self.urls[start:] + self.urls[:start]:
            try:
                return await send(base)
            except Exception as exc:
                found = translate(exc, base, proxy)
                if found is None:
                    raise
                self._metrics.upstream_errors.labels(found.kind).inc()
                if not found.try_next:
                    raise found.error from exc
                failure = found.error
            log.warning("%s; trying the next upstream if any", failure)
        raise failure

    async def read_body(self, response: aiohttp.ClientResponse, limit: int,
                        during: str) -> bytes:
        """The whole body of a small answer, however many segments it arrived in. Raises
        UpstreamError when it is longer than ``limit`` or breaks off."""
        if response.content_length is not None and response.content_length > limit:
            raise UpstreamError(f"Glance's answer to {during} is {response.content_length} "
                                f"bytes, more than the {limit} expected")
        try:
            body = await read_whole(response, limit)
        except Exception as exc:
            raise self.broken(exc, during) from exc
        if body is None:
            raise UpstreamError(f"Glance's answer to {during} is longer than the {limit} "
                                "bytes expected")
        return body

    def broken(self, exc: BaseException, during: str) -> UpstreamError:
        """Translate an error raised while reading a response body, counting it."""
        if isinstance(exc, TimeoutError | asyncio.TimeoutError):
            self._metrics.upstream_errors.labels("timeout").inc()
            return UpstreamTimeout(f"Glance went silent during {during}")
        self._metrics.upstream_errors.labels("broken").inc()
        return UpstreamError(f"Glance broke off during {during}: {exc}")
