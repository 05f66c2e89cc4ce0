"""Which Keystone roles a token holds: the gate of Glance's cache API on imgcache's listener.

imgcache never judges a token itself. It asks Keystone to validate it (``GET
/v3/auth/tokens`` with the token as both ``X-Auth-Token`` and ``X-Subject-Token``: any user
may validate its own token) and reads the roles from Keystone's answer. A valid token's
answer is remembered for a short TTL (never past the token's own expiry), keyed by a hash of
the token, in a ``Decisions`` table; invalid tokens are asked about every time. Tokens are
never logged.

Keystone's URL is ``[cache_api] keystone_url`` when set, else the one Glance names in its
401 answers (``WWW-Authenticate: Keystone uri="..."``), asked once and remembered.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiohttp

from imgcache.decisions import Decisions
from imgcache.errors import ImgcacheError, UpstreamError, UpstreamUnavailable
from imgcache.logs import log_safe
from imgcache.upstream import Upstream, read_whole

log = logging.getLogger(__name__)

_WWW_AUTHENTICATE = re.compile(r"""Keystone\s+uri\s*=\s*["']?([^"',\s]+)""", re.IGNORECASE)
#: A Keystone token is printable ASCII (fernet and JWS tokens are base64url text).
_TOKEN = re.compile(r"[\x21-\x7e]{1,8192}")
_MAX_ANSWER_BYTES = 1 << 20


class NotAuthenticated(ImgcacheError):
    """No token, or one Keystone does not accept (401)."""

    status = 401


class Forbidden(ImgcacheError):
    """The token is valid but holds none of the roles the cache API needs (403); ``caller``
    is whom Keystone says it belongs to."""

    status = 403

    def __init__(self, message: str, caller: Caller) -> None:
        super().__init__(message)
        self.caller = caller


@dataclass(frozen=True)
class Caller:
    """Who a valid token belongs to, as Keystone says; never the token itself."""

    user_id: str
    user_name: str
    scope: str  # "project NAME (ID)", "domain NAME", "the system scope"
    roles: frozenset[str]
    expires_at: float  # epoch seconds; 0 when Keystone gave none

    def expired(self) -> bool:
        """Whether the token's own expiry has passed (a remembered answer then no longer
        counts, whatever the TTL)."""
        return bool(self.expires_at) and self.expires_at <= time.time()

    def describe(self) -> str:
        """``user NAME (ID) in project P (ID)``: for logs and messages (names escaped by
        ``logs.log_safe``: a name with a space or a newline cannot add to a log line)."""
        return f"user {log_safe(self.user_name)} ({log_safe(self.user_id)}) in {self.scope}"


def keystone_from_www_authenticate(value: str) -> str | None:
    """The Keystone base URL in a ``WWW-Authenticate: Keystone uri="..."`` header, without
    a trailing slash or ``/v3``; None when the header names none."""
    match = _WWW_AUTHENTICATE.search(value)
    if match is None or not match.group(1).startswith(("http://", "https://")):
        return None
    return re.sub(r"/v3$", "", match.group(1).rstrip("/")).rstrip("/")


def caller_from_token_body(body: dict[str, Any]) -> Caller:
    """Read user, project and roles from Keystone's token validation answer."""
    token = body["token"]
    user = token.get("user") or {}
    if "project" in token:
        project = token["project"]
        scope = (f"project {log_safe(str(project.get('name')))} "
                 f"({log_safe(str(project.get('id')))})")
    elif "domain" in token:
        scope = f"domain {log_safe(str(token['domain'].get('name')))}"
    elif "system" in token:
        scope = "the system scope"
    else:
        scope = "no scope"
    return Caller(
        user_id=str(user.get("id", "")),
        user_name=str(user.get("name", "")),
        scope=scope,
        roles=frozenset(str(r.get("name")) for r in token.get("roles") or ()),
        expires_at=_epoch(token.get("expires_at")),
    )


def _epoch(text: object) -> float:
    if not isinstance(text, str):
        return 0.0
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


class KeystoneRoles:
    """Checks that a caller's token holds one of ``roles``, asking Keystone."""

    def __init__(self, upstream: Upstream, roles: frozenset[str], keystone_url: str | None,
                 ttl: float, *, connect_timeout: float, read_timeout: float,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.roles = roles
        self._upstream = upstream
        self._configured_url = keystone_url
        self._discovered_url: str | None = None
        self._ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
        self._timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout,
                                              sock_read=read_timeout)
        self._session: aiohttp.ClientSession | None = None
        # Keyed by (hash of the token, ""): Decisions indexes by image, which does not apply.
        self._valid: Decisions[Caller] = Decisions(ttl)
        self._asking: dict[str, asyncio.Future[Caller]] = {}

    async def start(self) -> None:
        """Open the client session to Keystone (call from the running loop)."""
        self._session = aiohttp.ClientSession(
            timeout=self._timeout, trust_env=False,
            connector=aiohttp.TCPConnector(limit=16, ssl=self._ssl))

    async def close(self) -> None:
        """Close the connections to Keystone."""
        if self._session is not None:
            await self._session.close()

    def set_ttl(self, ttl: float) -> None:
        """How long a valid token's answer is reused from now on (a reload); answers kept
        expire within it."""
        self._valid.set_ttl(ttl)

    @property
    def known_url(self) -> str | None:
        """Keystone's URL if configured or already discovered."""
        return self._configured_url or self._discovered_url

    async def require(self, headers: Mapping[str, str]) -> Caller:
        """The caller behind the request's ``X-Auth-Token`` if Keystone says it is valid
        and holds one of the roles. Raises NotAuthenticated (401), Forbidden (403) or an
        UpstreamError (503/502: Keystone or Glance could not be asked)."""
        token = headers.get("X-Auth-Token", "")
        if not token:
            raise NotAuthenticated("Glance's cache API needs a Keystone token in "
                                   "X-Auth-Token")
        if not _TOKEN.fullmatch(token):
            raise NotAuthenticated("the X-Auth-Token header is not a Keystone token")
        caller = await self.validate(token)
        if not caller.roles & self.roles:
            raise Forbidden(f"the cache API needs the role {' or '.join(sorted(self.roles))} "
                            f"([cache_api] roles); this token of {caller.describe()} has "
                            f"{', '.join(sorted(caller.roles)) or 'no roles'}", caller)
        return caller

    async def validate(self, token: str) -> Caller:
        """Keystone's answer for a token (remembered for the TTL); concurrent questions
        about one token share one request."""
        key = hashlib.sha256(token.encode()).hexdigest()
        remembered = self._valid.get(key, "")
        if remembered is not None and not remembered.expired():
            return remembered
        asking = self._asking.get(key)
        if asking is None:
            asking = asyncio.ensure_future(self._ask(key, token))
            self._asking[key] = asking
            asking.add_done_callback(lambda _: self._asking.pop(key, None))
        return await asyncio.shield(asking)

    async def _ask(self, key: str, token: str) -> Caller:
        base = await self._keystone_url()
        assert self._session is not None, "KeystoneRoles.start() was not called"
        url = f"{base}/v3/auth/tokens?nocatalog"
        try:
            async with self._session.get(url, headers={
                    "X-Auth-Token": token, "X-Subject-Token": token,
                    "Accept": "application/json"}) as response:
                body = await read_whole(response, _MAX_ANSWER_BYTES)
                if body is None:
                    raise UpstreamError(f"Keystone at {base} sent a token validation of more "
                                        f"than {_MAX_ANSWER_BYTES} bytes")
                status = response.status
        except (aiohttp.ClientConnectorError, TimeoutError) as exc:
            raise UpstreamUnavailable(f"cannot ask Keystone at {base} for the token's roles: "
                                      f"{exc}; set [cache_api] keystone_url if this is not "
                                      "the Keystone this node can reach") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"Keystone at {base} failed while validating the token: "
                                f"{exc}") from exc
        if status in (401, 404):
            raise NotAuthenticated("Keystone does not accept this token (expired, revoked "
                                   "or unknown)")
        if status != 200:
            raise UpstreamError(f"Keystone at {base} answered {status} to the token "
                                "validation")
        try:
            caller = caller_from_token_body(json.loads(body))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UpstreamError(f"Keystone at {base} sent a token validation that is not "
                                "the JSON of a token") from exc
        if not caller.expired():
            self._valid.remember(key, "", caller)
        return caller

    async def _keystone_url(self) -> str:
        if self.known_url:
            return self.known_url
        # An unauthenticated request: Glance's auth middleware answers 401 naming Keystone.
        response = await self._upstream.request("GET", "/v2/images", {})
        try:
            header = ",".join(response.headers.getall("WWW-Authenticate", []))
        finally:
            response.release()
        url = keystone_from_www_authenticate(header)
        if url is None:
            raise UpstreamUnavailable(
                f"Glance answered {response.status} without naming a Keystone "
                "(WWW-Authenticate: Keystone uri=...): set [cache_api] keystone_url")
        log.info("cache API: checking tokens with Keystone at %s (named by Glance)", url)
        self._discovered_url = url
        return url
