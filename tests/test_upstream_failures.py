"""The translation of failed upstream requests: every exception the two clients raise gets
its metric kind, its status, whether the next URL is tried, and a message naming the
upstream; the same failure reads the same from either client."""

from __future__ import annotations

import ssl
from types import SimpleNamespace

import aiohttp
import pytest

from imgcache.datafetch import (
    BadAnswer,
    ConnectFailed,
    ConnectTimedOut,
    Disconnected,
    TunnelRefused,
)
from imgcache.errors import UpstreamError, UpstreamTimeout, UpstreamUnavailable
from imgcache.upstream_failures import from_aiohttp, from_datafetch

BASE = "https://glance.example:9292"
PROXY = "http://proxy.example:3128"
KEY = SimpleNamespace(host="glance.example", port=9292, ssl=True, is_ssl=True)
REFUSED = ConnectionRefusedError(111, "Connection refused")


def untrusted() -> ssl.SSLCertVerificationError:
    error = ssl.SSLCertVerificationError(1, "certificate verify failed")
    error.verify_message = "self-signed certificate"
    return error


# (exception, kind, error class, next URL tried, words the message must hold)
AIOHTTP = [
    (aiohttp.ClientProxyConnectionError(KEY, REFUSED), "connect", UpstreamUnavailable, True,
     f"cannot connect to the image-data proxy {PROXY}: [Errno 111]"),
    (aiohttp.ClientConnectorCertificateError(KEY, untrusted()), "tls", UpstreamError, True,
     f"TLS certificate verification of Glance at {BASE} failed: self-signed certificate "
     "(see [upstream] ca_file)"),
    (aiohttp.ClientConnectorSSLError(KEY, ssl.SSLError(1, "bad handshake")), "tls",
     UpstreamError, True, f"TLS handshake with Glance at {BASE} failed"),
    (aiohttp.ConnectionTimeoutError(), "timeout", UpstreamTimeout, True,
     f"connecting to Glance at {BASE} timed out"),
    (aiohttp.ClientConnectorError(KEY, REFUSED), "connect", UpstreamUnavailable, True,
     f"cannot connect to Glance at {BASE}: [Errno 111]"),
    (TimeoutError(), "timeout", UpstreamTimeout, False,
     f"Glance at {BASE} did not answer in time"),
    (aiohttp.ServerDisconnectedError(), "broken", UpstreamError, False,
     "refuses a missing or untrusted client certificate ([upstream] cert_file)"),
    (aiohttp.ClientPayloadError("cut short"), "broken", UpstreamError, False,
     f"request to Glance at {BASE} failed: cut short"),
]

DATAFETCH = [
    (ConnectFailed(REFUSED, via_proxy=True), "connect", UpstreamUnavailable, True,
     f"cannot connect to the image-data proxy {PROXY}: [Errno 111]"),
    (ConnectFailed(REFUSED, via_proxy=False), "connect", UpstreamUnavailable, True,
     f"cannot connect to Glance at {BASE}: [Errno 111]"),
    (TunnelRefused(407), "connect", UpstreamUnavailable, True,
     f"the image-data proxy {PROXY} refused a tunnel to Glance at {BASE} (407)"),
    (untrusted(), "tls", UpstreamError, True,
     f"TLS certificate verification of Glance at {BASE} failed: self-signed certificate "
     "(see [upstream] ca_file)"),
    (ssl.SSLError(1, "bad handshake"), "tls", UpstreamError, True,
     f"TLS handshake with Glance at {BASE} failed"),
    (ConnectTimedOut(), "timeout", UpstreamTimeout, True,
     f"connecting to Glance at {BASE} timed out"),
    (TimeoutError(), "timeout", UpstreamTimeout, False,
     f"Glance at {BASE} did not answer in time"),
    (Disconnected("closed"), "broken", UpstreamError, False,
     "refuses a missing or untrusted client certificate ([upstream] cert_file)"),
    (OSError(5, "Input/output error"), "broken", UpstreamError, False,
     "refuses a missing or untrusted client certificate ([upstream] cert_file)"),
    (BadAnswer("not HTTP"), "broken", UpstreamError, False,
     f"request to Glance at {BASE} failed: not HTTP"),
    (ValueError("bad header line"), "broken", UpstreamError, False,
     f"request to Glance at {BASE} failed: bad header line"),
]


@pytest.mark.parametrize(("translate", "exc", "kind", "error", "try_next", "message"), [
    *((from_aiohttp, *case) for case in AIOHTTP),
    *((from_datafetch, *case) for case in DATAFETCH),
], ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else None)
def test_each_failure_has_its_kind_status_and_message(
    translate: object, exc: Exception, kind: str, error: type[UpstreamError], try_next: bool,
    message: str,
) -> None:
    assert callable(translate)
    failure = translate(exc, BASE, PROXY)
    assert failure is not None
    assert (failure.kind, type(failure.error), failure.try_next) == (kind, error, try_next)
    assert message in str(failure.error)


@pytest.mark.parametrize(("translate", "exc", "base", "hinted"), [
    (from_datafetch, Disconnected("closed"), BASE, True),
    (from_datafetch, Disconnected("closed"), "HTTPS://glance.example:9292", True),
    (from_datafetch, Disconnected("closed"), "http://glance.example:9292", False),
    (from_datafetch, BadAnswer("not HTTP"), BASE, False),
    (from_datafetch, ValueError("bad header line"), BASE, False),
    (from_aiohttp, aiohttp.ServerDisconnectedError(), BASE, True),
    (from_aiohttp, aiohttp.ServerDisconnectedError(), "http://glance.example:9292", False),
    (from_aiohttp, aiohttp.ClientPayloadError("cut short"), BASE, False),
])
def test_the_client_certificate_hint_is_given_only_for_a_dropped_https_connection(
    translate: object, exc: Exception, base: str, hinted: bool
) -> None:
    # Over TLS 1.3 a server refusing the client certificate just closes the connection.
    assert callable(translate)
    failure = translate(exc, base, None)
    assert failure is not None
    assert ("[upstream] cert_file" in str(failure.error)) == hinted


def test_what_is_not_a_request_failure_is_left_to_the_caller() -> None:
    assert from_aiohttp(KeyError("bug"), BASE, None) is None
    assert from_datafetch(KeyError("bug"), BASE, None) is None
