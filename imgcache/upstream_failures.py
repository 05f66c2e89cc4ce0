"""What a failed request to one Glance URL means: the kind it is counted under
(``imgcache_upstream_errors_total``), the error a client sees, and whether the next URL may
be tried (the connection failed, so nothing was sent). The pass-through's aiohttp client
and the image-data client (``datafetch``) raise different exceptions for the same failures;
both are translated here into the same kinds and messages."""

from __future__ import annotations

import ssl
from dataclasses import dataclass

import aiohttp

from imgcache.datafetch import (
    BadAnswer,
    ConnectFailed,
    ConnectTimedOut,
    Disconnected,
    TunnelRefused,
)
from imgcache.errors import UpstreamError, UpstreamTimeout, UpstreamUnavailable


@dataclass(frozen=True)
class Failure:
    """A request to one upstream URL that failed: ``kind`` is the metric label, ``error``
    what to raise, ``try_next`` whether another URL may be tried."""

    kind: str
    error: UpstreamError
    try_next: bool


def from_aiohttp(exc: Exception, base: str, proxy: str | None) -> Failure | None:
    """The failure an exception of aiohttp's client means (None: not one of its own)."""
    if isinstance(exc, aiohttp.ClientProxyConnectionError):
        return _proxy_unreachable(proxy, exc.os_error)
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        reason = getattr(exc.certificate_error, "verify_message", None)
        return _untrusted(base, reason or exc.certificate_error)
    if isinstance(exc, aiohttp.ClientSSLError):
        return _handshake_failed(base, exc)
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return _connect_timed_out(base)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return _unreachable(base, exc.os_error)
    if isinstance(exc, TimeoutError):
        return _silent(base)
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return _broken(base, exc, disconnected=True)
    if isinstance(exc, aiohttp.ClientError):
        return _broken(base, exc, disconnected=False)
    return None


def from_datafetch(exc: Exception, base: str, proxy: str | None) -> Failure | None:
    """The failure an exception of the image-data client means (None: not a failure of
    the request)."""
    if isinstance(exc, ConnectFailed):
        return (_proxy_unreachable(proxy, exc.os_error) if exc.via_proxy
                else _unreachable(base, exc.os_error))
    if isinstance(exc, TunnelRefused):
        return Failure("connect", UpstreamUnavailable(
            f"the image-data proxy {proxy} refused a tunnel to Glance at {base} "
            f"({exc.status})"), try_next=True)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _untrusted(base, exc.verify_message or exc)
    if isinstance(exc, ssl.SSLError):
        return _handshake_failed(base, exc)
    if isinstance(exc, ConnectTimedOut):
        return _connect_timed_out(base)
    if isinstance(exc, TimeoutError):
        return _silent(base)
    if isinstance(exc, Disconnected | OSError):
        return _broken(base, exc, disconnected=True)
    if isinstance(exc, BadAnswer | ValueError):
        return _broken(base, exc, disconnected=False)
    return None


def _unreachable(base: str, os_error: OSError) -> Failure:
    # 503, not 502: Nova retries a 503 ([glance] num_retries).
    return Failure("connect", UpstreamUnavailable(
        f"cannot connect to Glance at {base}: {os_error}"), try_next=True)


def _proxy_unreachable(proxy: str | None, os_error: OSError) -> Failure:
    return Failure("connect", UpstreamUnavailable(
        f"cannot connect to the image-data proxy {proxy}: {os_error}"), try_next=True)


def _untrusted(base: str, reason: object) -> Failure:
    return Failure("tls", UpstreamError(
        f"TLS certificate verification of Glance at {base} failed: {reason} "
        "(see [upstream] ca_file)"), try_next=True)


def _handshake_failed(base: str, exc: Exception) -> Failure:
    return Failure("tls", UpstreamError(f"TLS handshake with Glance at {base} failed: {exc}"),
                   try_next=True)


def _connect_timed_out(base: str) -> Failure:
    return Failure("timeout", UpstreamTimeout(f"connecting to Glance at {base} timed out"),
                   try_next=True)


def _silent(base: str) -> Failure:
    return Failure("timeout", UpstreamTimeout(f"Glance at {base} did not answer in time"),
                   try_next=False)


def _broken(base: str, exc: Exception, disconnected: bool) -> Failure:
    hint = ("; over TLS 1.3 this is also how Glance refuses a missing or untrusted client "
            "certificate ([upstream] cert_file)"
            if disconnected and base.lower().startswith("https:") else "")
    return Failure("broken", UpstreamError(f"request to Glance at {base} failed: {exc}{hint}"),
                   try_next=False)
