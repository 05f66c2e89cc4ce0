"""Glance decides who reads an image, and tokens stay secret.

A caller Glance denies never receives a byte of an image, whether it is cached, in flight or
asked for by range; it gets Glance's short JSON error. Credentials are judged by Glance only:
a credential imgcache does not recognise as one must not let an "allowed" answer be reused
for callers without it. No token appears in a log line or in a metric.

The stand-in here reads tokens as a real Glance's keystonemiddleware does
(``keystonemiddleware/auth_token/_request.py``: ``X-Auth-Token``, else ``X-Storage-Token``),
and can play a Glance behind eventlet.wsgi or uWSGI, which map a header name with ``_`` and
one with ``-`` to the same ``HTTP_X_AUTH_TOKEN``, joining the values with a comma.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import aiohttp
import pytest
from aiohttp import web
from inloop import Imgcache, ImgcacheFactory
from multidict import CIMultiDict

from imgcache.standin import Fault, GlanceStandin

MiB = 1 << 20
# Token-like secrets, unique to this module so that finding one anywhere is a leak.
OWNER = f"gAAAAAB-owner-{uuid.uuid4().hex}"
OTHER = f"gAAAAAB-other-{uuid.uuid4().hex}"
UNKNOWN = f"gAAAAAB-unknown-{uuid.uuid4().hex}"
SERVICE = f"gAAAAAB-service-{uuid.uuid4().hex}"
BEARER = f"Bearer bearer-{uuid.uuid4().hex}"
SECRETS = (OWNER, OTHER, UNKNOWN, SERVICE, BEARER.split()[1])
BROKEN_OFF = (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError)


class KeystoneGlance(GlanceStandin):
    """The stand-in taking the caller's token the way keystonemiddleware does; optionally
    behind a WSGI server that maps ``X_Auth_Token`` and ``X-Auth-Token`` to one variable."""

    underscores_are_dashes = False

    def _environ_name(self, header: str) -> str:
        upper = header.upper()
        return upper.replace("-", "_") if self.underscores_are_dashes else upper

    def _environ(self, request: web.Request, header: str) -> str | None:
        """The value the application sees for ``header``: all same-named ones joined."""
        values = [value for name, value in request.headers.items()
                  if self._environ_name(name) == self._environ_name(header)]
        return ",".join(values) if values else None

    def _token(self, request: web.Request) -> str:
        token = self._environ(request, "X-Auth-Token")
        if token is None:
            token = self._environ(request, "X-Storage-Token")
        headers = CIMultiDict((name, value) for name, value in request.headers.items()
                              if self._environ_name(name) != self._environ_name("X-Auth-Token"))
        if token is not None:
            headers["X-Auth-Token"] = token
        return super()._token(cast(web.Request, _HeadersOnly(headers)))


class _HeadersOnly:
    """All of a request that GlanceStandin._token reads."""

    def __init__(self, headers: CIMultiDict[str]) -> None:
        self.headers = headers


@pytest.fixture
async def glance(glance_dir: Path) -> AsyncIterator[KeystoneGlance]:
    """Overrides conftest's: the imgcache fixtures of this module stand in front of it."""
    standin = KeystoneGlance(glance_dir, tokens=(OWNER, OTHER, SERVICE))
    await standin.start()
    yield standin
    await standin.stop()


async def fetch(session: aiohttp.ClientSession, url: str,
                headers: dict[str, str]) -> tuple[int, bytes]:
    async with session.get(url, headers=headers) as response:
        return response.status, await response.read()


def assert_glance_error_only(status: int, body: bytes, expected_status: int,
                             image: bytes) -> None:
    """The answer is Glance's short JSON error, with not one run of image bytes in it."""
    assert status == expected_status, (status, body[:200])
    assert len(body) < 1024
    assert json.loads(body)["error"]["code"] == expected_status
    assert not any(body[i:i + 16] in image for i in range(0, max(1, len(body) - 15), 8))


DENIED_CALLERS = [
    pytest.param({"X-Auth-Token": OTHER}, 404, id="another-users-token"),
    pytest.param({"X-Auth-Token": UNKNOWN}, 401, id="unknown-token"),
    pytest.param({}, 401, id="no-token"),
    pytest.param({"X-Storage-Token": UNKNOWN}, 401, id="unknown-storage-token"),
    pytest.param({"X-Auth-Token": OTHER, "X-Storage-Token": OWNER}, 404,
                 id="owner-storage-token-behind-another-token"),
]
RANGES = [None, "bytes=0-99", "bytes=-100", "bytes=100-", "bytes=0-"]


@pytest.mark.parametrize(("caller", "expected"), DENIED_CALLERS)
async def test_a_denied_caller_never_gets_a_byte_in_flight_on_a_hit_or_in_a_range(
    glance: KeystoneGlance, imgcache: Imgcache, caller: dict[str, str], expected: int
) -> None:
    image = await glance.add_image(size=4 * MiB, owner_tokens=[OWNER])
    data = await asyncio.to_thread(Path(image.path or "").read_bytes)
    glance.faults[image.id] = Fault(rate=MiB)  # the fill takes about 4 s
    url = imgcache.data_url(image.id)
    assert (await fetch(imgcache.session, f"{glance.url}/v2/images/{image.id}/file",
                        caller))[0] == expected  # what Glance itself answers this caller
    owner = asyncio.create_task(fetch(imgcache.session, url, {"X-Auth-Token": OWNER}))
    await imgcache.wait_for_metric("imgcache_fills_in_progress", 1)
    for stage in ("in flight", "hit"):
        for byte_range in RANGES:
            headers = dict(caller, **({"Range": byte_range} if byte_range else {}))
            status, body = await fetch(imgcache.session, url, headers)
            assert_glance_error_only(status, body, expected, data)
        if stage == "in flight":
            assert not owner.done(), "the fill ended before the in-flight requests"
            assert await owner == (200, data)
            await imgcache.wait_for_metric('imgcache_fills_total{outcome="committed"}', 1)
    metrics = await imgcache.metrics()
    assert metrics['imgcache_served_bytes_total{result="denied"}'] == 0
    assert metrics['imgcache_requests_total{result="denied"}'] == 2 * len(RANGES)
    assert glance.data_gets(image.id) == 2  # the fill's, and the direct look above


async def test_a_token_sent_as_x_storage_token_opens_the_image_to_that_caller_only(
    glance: KeystoneGlance, imgcache: Imgcache
) -> None:
    """keystonemiddleware takes the token from X-Storage-Token when there is no
    X-Auth-Token. imgcache must not remember Glance's "allowed" for it as an answer to
    "no credentials at all", which every anonymous caller presents."""
    image = await glance.add_image(size=MiB, owner_tokens=[OWNER])
    data = await asyncio.to_thread(Path(image.path or "").read_bytes)
    assert await fetch(imgcache.session, imgcache.data_url(image.id),
                       {"X-Storage-Token": OWNER}) == (200, data)
    for anonymous in ({}, {"X-Auth-Token": ""}, {"X-Storage-Token": UNKNOWN}):
        status, body = await fetch(imgcache.session, imgcache.data_url(image.id), anonymous)
        assert_glance_error_only(status, body, 401, data)


async def test_an_underscore_spelled_token_opens_the_image_to_that_caller_only(
    glance: KeystoneGlance, imgcache: Imgcache
) -> None:
    """Behind eventlet.wsgi or uWSGI, Glance reads ``X_Auth_Token`` as X-Auth-Token."""
    glance.underscores_are_dashes = True
    image = await glance.add_image(size=MiB, owner_tokens=[OWNER])
    data = await asyncio.to_thread(Path(image.path or "").read_bytes)
    assert await fetch(imgcache.session, f"{glance.url}/v2/images/{image.id}/file",
                       {"X_Auth_Token": OWNER}) == (200, data)  # the model holds
    assert await fetch(imgcache.session, imgcache.data_url(image.id),
                       {"X_Auth_Token": OWNER}) == (200, data)
    status, body = await fetch(imgcache.session, imgcache.data_url(image.id), {})
    assert_glance_error_only(status, body, 401, data)


async def test_a_token_with_a_byte_that_is_not_utf8_is_judged_by_glance_as_sent(
    glance: KeystoneGlance, imgcache: Imgcache
) -> None:
    """imgcache may refuse such a token, or forward it as it came; it must not forward an
    altered one (say with the odd byte dropped), which Glance would judge instead."""
    image = await glance.add_image(size=MiB, owner_tokens=[OWNER])
    request = (f"GET /v2/images/{image.id}/file HTTP/1.1\r\nHost: imgcache\r\n"
               f"Connection: close\r\nX-Auth-Token: {OWNER}").encode() + b"\xff\r\n\r\n"
    answers = []
    for base in (glance.url, imgcache.url):
        host, port = base.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(request)
        async with asyncio.timeout(30):
            answer = await reader.read()
        writer.close()
        answers.append(int(answer.split(b" ", 2)[1]))
    glance_status, imgcache_status = answers
    assert glance_status == 401
    assert 400 <= imgcache_status < 500 and imgcache_status != 200


# -- secrets in logs and metrics ------------------------------------------------------------


async def exercise_every_path(glance: KeystoneGlance, imgcache_factory: ImgcacheFactory
                              ) -> Imgcache:
    """Drive imgcache through hits, misses, coalescing, ranges, denials, bad requests, a
    failed fill, a client leaving, a bypass, pass-through reads and an upload, with every
    kind of credential header carrying a secret."""
    imgcache = await imgcache_factory(max_size="8M")
    owner = {"X-Auth-Token": OWNER, "X-Service-Token": SERVICE, "Authorization": BEARER}
    image = await glance.add_image(size=2 * MiB, owner_tokens=[OWNER])
    glance.faults[image.id] = Fault(rate=4 * MiB)
    url = imgcache.data_url(image.id)
    session = imgcache.session
    results = await asyncio.gather(*(fetch(session, url, owner) for _ in range(3)),
                                   fetch(session, url, dict(owner, Range="bytes=5-9")))
    assert [status for status, _ in results] == [200, 200, 200, 206]
    await imgcache.wait_for_metric('imgcache_fills_total{outcome="committed"}', 1)
    for headers, status in [
        (owner, 200), (dict(owner, Range="bytes=-10"), 206), ({"X-Auth-Token": OTHER}, 404),
        ({"X-Auth-Token": UNKNOWN}, 401), ({"X-Storage-Token": UNKNOWN}, 401),
        (dict(owner, Range="bytes=9-1"), 416), (dict(owner, Range="bytes=0-1,4-5"), 400),
    ]:
        assert (await fetch(session, url, headers))[0] == status
    assert (await fetch(session, f"{imgcache.url}/v2/images/not-a-uuid/file", owner))[0] == 400
    broken = await glance.add_image(size=MiB, owner_tokens=[OWNER])
    glance.faults[broken.id] = Fault(corrupt_at=MiB // 2, times=1)
    with pytest.raises(BROKEN_OFF):
        await fetch(session, imgcache.data_url(broken.id), owner)
    await imgcache.wait_for_metric("imgcache_checksum_failures_total", 1)
    glance.faults[broken.id] = Fault(status=500, times=1)
    with contextlib.suppress(*BROKEN_OFF):  # imgcache may try Glance again, or give up
        await fetch(session, imgcache.data_url(broken.id), owner)
    async with session.get(imgcache.data_url(broken.id), headers=owner) as response:
        await response.content.readany()  # and leave mid-body
    big = await glance.add_image(size=9 * MiB, owner_tokens=[OWNER])
    status, body = await fetch(session, imgcache.data_url(big.id), owner)
    assert status == 200 and len(body) == 9 * MiB  # larger than the cap: BYPASS
    assert (await fetch(session, f"{imgcache.url}/v2/images", owner))[0] == 200
    assert (await fetch(session, f"{imgcache.url}/v2/images/{image.id}", owner))[0] == 200
    async with session.post(f"{imgcache.url}/v2/images", headers=owner,
                            json={"name": "upload"}) as response:
        created = await response.json()
    async with session.put(f"{imgcache.url}/v2/images/{created['id']}/file", data=b"x" * 1000,
                           headers=dict(owner, **{"Content-Type": "application/octet-stream"})
                           ) as response:
        assert response.status == 204
    await imgcache.wait_for_metric('imgcache_fills_total{outcome="committed"}', 2)
    return imgcache


async def test_no_token_appears_in_any_log_line(
    glance: KeystoneGlance, imgcache_factory: ImgcacheFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await exercise_every_path(glance, imgcache_factory)
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    lines = [formatter.format(record) for record in caplog.records]
    assert sum("image request" in line for line in lines) >= 12  # the access log was seen
    assert any("fill of image" in line for line in lines)  # and the failed fills
    leaks = [line for line in lines for secret in SECRETS if secret in line]
    assert leaks == []


async def test_no_token_appears_in_any_metric(
    glance: KeystoneGlance, imgcache_factory: ImgcacheFactory
) -> None:
    imgcache = await exercise_every_path(glance, imgcache_factory)
    async with imgcache.session.get(imgcache.metrics_url + "/metrics") as response:
        scrape = await response.text()
    assert 'imgcache_requests_total{result="denied"}' in scrape
    assert [secret for secret in SECRETS if secret in scrape] == []
