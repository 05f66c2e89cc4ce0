"""The only module that talks to Glance: one aiohttp ClientSession, timeouts fit for
multi-GB downloads, fail-over across the configured URLs, and aiohttp's exceptions
translated into errors that carry the status a client should see."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from imgcache.errors import UpstreamError, UpstreamTimeout, UpstreamUnavailable
from imgcache.metrics import Metrics

log = logging.getLogger(__name__)

#: Headers that describe one connection, not the message (RFC 9110 section 7.6.1); never
#: forwarded in either direction. Host is set by the client for the upstream it talks to.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "trailers", "transfer-encoding", "upgrade", "host",
})

#: Headers aiohttp's client would otherwise add on its own; a pass-through adds nothing.
_NO_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


def end_to_end_headers(headers: Mapping[str, str]) -> CIMultiDict[str]:
    """Copy ``headers`` without hop-by-hop ones, including any the Connection header names."""
    named = {
        token.strip().lower()
        for value in _getall(headers, "Connection")
        for token in value.split(",")
    }
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lower = name.lower()
        if lower not in HOP_BY_HOP and lower not in named:
            out.add(name, value)
    return out


def _getall(headers: Mapping[str, str], name: str) -> list[str]:
    if isinstance(headers, CIMultiDict | CIMultiDictProxy):
        return headers.getall(name, [])
    value = headers.get(name)
    return [value] if value else []


class Upstream:
    """A pool of connections to Glance, tried in the configured order."""

    def __init__(self, urls: tuple[str, ...], *, connect_timeout: float, read_timeout: float,
                 metrics: Metrics) -> None:
        self.urls = urls
        self._metrics = metrics
        # No total timeout: a 20 GB image may take many minutes. Silence is what times out.
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=connect_timeout, sock_read=read_timeout)
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        """Open the client session (call from the running loop)."""
        self._session = aiohttp.ClientSession(
            timeout=self._timeout,
            auto_decompress=False,
            read_bufsize=2 << 20,
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=60),
            skip_auto_headers=_NO_AUTO_HEADERS,
            trust_env=False,
        )

    async def close(self) -> None:
        """Close every upstream connection."""
        if self._session is not None:
            await self._session.close()

    async def request(self, method: str, path_qs: str, headers: Mapping[str, str],
                      data: Any = None, rotate: int = 0) -> aiohttp.ClientResponse:
        """Send a request to the first upstream that accepts the connection; the caller
        must release the response. ``path_qs`` is the raw (still percent-encoded) path
        and query. Connection failures move on to the next URL (nothing was sent yet);
        other failures raise an UpstreamError subclass. ``rotate`` starts the round at
        another URL (a retry goes to the next upstream first)."""
        assert self._session is not None, "Upstream.start() was not called"
        failure: UpstreamError = UpstreamUnavailable("no upstream configured")
        start = rotate % len(self.urls) if self.urls else 0
        for base in self.urls[start:] + self.urls[:start]:
            url = URL(base + path_qs, encoded=True)
            try:
                return await self._session.request(
                    method, url, headers=end_to_end_headers(headers), data=data,
                    allow_redirects=False, compress=None, chunked=None,
                )
            except aiohttp.ConnectionTimeoutError:
                self._metrics.upstream_errors.labels("timeout").inc()
                failure = UpstreamTimeout(f"connecting to Glance at {base} timed out")
            except aiohttp.ClientConnectorError as exc:
                self._metrics.upstream_errors.labels("connect").inc()
                # 503, not 502: Nova retries a 503 ([glance] num_retries).
                failure = UpstreamUnavailable(
                    f"cannot connect to Glance at {base}: {exc.os_error}")
            except TimeoutError as exc:
                self._metrics.upstream_errors.labels("timeout").inc()
                raise UpstreamTimeout(f"Glance at {base} did not answer in time") from exc
            except aiohttp.ClientError as exc:
                self._metrics.upstream_errors.labels("broken").inc()
                raise UpstreamError(f"request to Glance at {base} failed: {exc}") from exc
            log.warning("%s; trying the next upstream if any", failure)
        raise failure

    def broken(self, exc: BaseException, during: str) -> UpstreamError:
        """Translate an error raised while reading a response body, counting it."""
        if isinstance(exc, TimeoutError | asyncio.TimeoutError):
            self._metrics.upstream_errors.labels("timeout").inc()
            return UpstreamTimeout(f"Glance went silent during {during}")
        self._metrics.upstream_errors.labels("broken").inc()
        return UpstreamError(f"Glance broke off during {during}: {exc}")
