"""Callers' credentials: which request headers say who a caller is, and the set of callers
whose credentials a fill may download with.

imgcache never judges a credential itself: it only tells apart callers who sent different
ones (for the decision cache), and keeps the headers of callers Glance allowed, so that a
download never depends on one caller's token staying valid.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping

from multidict import CIMultiDict

#: Request headers that cannot carry who the caller is; every OTHER header counts as part of
#: the caller's credentials, so that no header Glance (or a middleware in front of it) might
#: read as one is ever left out: X-Auth-Token, X-Storage-Token, X-Service-Token,
#: Authorization, X-Roles for a noauth Glance, underscore spellings, cookies...
NON_IDENTITY_HEADERS = frozenset({
    "host", "user-agent", "accept", "accept-encoding", "accept-language", "connection",
    "keep-alive", "content-length", "content-type", "transfer-encoding", "expect", "range",
    "if-range", "if-match", "if-none-match", "if-modified-since", "if-unmodified-since",
    "x-openstack-request-id", "te", "upgrade", "via", "x-forwarded-for", "traceparent",
    "tracestate",
})
#: Request headers that describe the client's own data request, not who it is: never sent
#: on the questions asked for it, nor on the downloads it shares with other callers.
DATA_REQUEST_HEADERS = ("Range", "If-Range", "Accept-Encoding", "If-Match", "If-None-Match",
                        "If-Modified-Since", "If-Unmodified-Since")
#: Callers' credentials a fill keeps to go on with when Glance refuses the current ones (the
#: starter's, which is never crowded out, and the newest joiners').
MAX_KEPT_CALLERS = 8
#: Headers that carry a bearer credential: a fill keeps one caller per distinct value of
#: these, so that one caller repeating its token with other headers takes one place.
TOKEN_HEADERS = ("x-auth-token", "x-storage-token", "x-service-token", "authorization")


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


def _caller_key(headers: Mapping[str, str]) -> str:
    """Which kept caller these headers are: their bearer credentials when they carry any,
    else their whole fingerprint."""
    tokens = [(name, value) for name, value in sorted(
        (name.lower().replace("_", "-"), value) for name, value in headers.items())
        if name in TOKEN_HEADERS]
    if not tokens:
        return credential_fingerprint(headers) or ""
    digest = hashlib.sha256()
    for name, value in tokens:
        digest.update(f"{name}\0{value}\0".encode("utf-8", "surrogateescape"))
    return "token:" + digest.hexdigest()


class AllowedCallers:
    """The request headers of callers Glance allowed to download one image, newest first:
    a download goes on with them, and with the next one when Glance refuses the current one
    (a token expired or was revoked mid-download). At most MAX_KEPT_CALLERS are kept, one per
    bearer credential; the first caller's are kept until Glance refuses them, however many
    join after it (so that joiners refused later, or one caller joining again and again,
    never leave a fill without its starter's credentials). The headers are never logged."""

    def __init__(self, first: Mapping[str, str]) -> None:
        self._callers: OrderedDict[str, CIMultiDict[str]] = OrderedDict()
        self._first = _caller_key(first)
        self.add(first)

    def __len__(self) -> int:
        return len(self._callers)

    def add(self, headers: Mapping[str, str]) -> None:
        """Another allowed caller: its credentials are tried first from now on."""
        key = _caller_key(headers)
        self._callers.pop(key, None)
        self._callers[key] = CIMultiDict(headers)
        while len(self._callers) > MAX_KEPT_CALLERS:
            oldest = next(key for key in self._callers if key != self._first)
            del self._callers[oldest]

    def current(self) -> CIMultiDict[str] | None:
        """The headers to download with now (None once every caller was refused)."""
        if not self._callers:
            return None
        return next(reversed(self._callers.values()))

    def refused(self, headers: Mapping[str, str]) -> bool:
        """Glance refused these headers: never use them again. Returns whether another
        caller's are left to go on with."""
        self._callers.pop(_caller_key(headers), None)
        return bool(self._callers)
