"""Attacks on the promises of the README's "Who may read an image" section and on the
endings, from a hostile review: each test is one attack that must fail.

Real parts only: the Glance stand-in across the test network, imgcache in the test's loop,
reloads through ``app.apply_reload`` (what SIGHUP runs), the wire through tests/rawhttp.py."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import rawhttp
from inloop import OTHER_TOKEN, TOKEN, Imgcache, ImgcacheFactory
from test_trust import cached_with_tokens_remembered

from imgcache.app import Running, apply_reload, running
from imgcache.config import load_settings
from imgcache.credentials import MAX_KEPT_CALLERS
from imgcache.standin import Fault, GlanceStandin

MiB = 1 << 20
READER = "token-reader"


def sha512(data: bytes) -> str:
    return hashlib.sha512(data).hexdigest()


def _fill_gets(glance: GlanceStandin, image_id: str) -> list[Any]:
    """The stand-in's logged data GETs of an image other than one-byte download checks."""
    return [r for r in glance.requests if r.path == f"/v2/images/{image_id}/file"
            and r.headers.get("Range") != "bytes=0-0"]


# -- a fill never depends on one caller ------------------------------------------------------

async def _crowd_out(glance: GlanceStandin, imgcache: Imgcache, joiners: list[dict[str, str]],
                     revoked: set[str]) -> None:
    """The starter (TOKEN) begins a fill of a 12 MiB image; the joiners join it; the
    ``revoked`` tokens are revoked; the upstream connection breaks at 6 MiB. The starter's
    token is valid throughout: its download must come out whole."""
    image = await glance.add_image(size=12 * MiB,
                                   owner_tokens=[TOKEN, OTHER_TOKEN, *glance.tokens])
    glance.faults[image.id] = Fault(rate=3 * MiB, reset_at=6 * MiB, times=1)
    starter = asyncio.create_task(imgcache.get(image.id, token=TOKEN))
    await asyncio.sleep(0.2)
    joined = [asyncio.create_task(imgcache.get(image.id, token=None, headers=h))
              for h in joiners]
    async with asyncio.timeout(5):
        while len([r for r in glance.requests
                   if r.path == f"/v2/images/{image.id}"]) < 1 + len(joiners):
            await asyncio.sleep(0.02)
    await asyncio.sleep(0.2)  # every joiner is past its questions and reading the fill
    # Before the break: the fill's first data GET has not ended (the stand-in logs a request
    # when its response ends).
    assert _fill_gets(glance, image.id) == [] and not starter.done()
    glance.tokens -= revoked
    try:
        status, _, body = await starter
    except aiohttp.ClientError as exc:
        pytest.fail(f"the starter's download broke although its token stayed valid: {exc!r}",
                    pytrace=False)
    await asyncio.gather(*joined, return_exceptions=True)
    assert status == 200 and sha512(body) == image.os_hash_value
    gets = [(r.headers["X-Auth-Token"], r.status) for r in _fill_gets(glance, image.id)]
    assert gets[-1] == (TOKEN, 206), gets


async def test_one_caller_padding_its_headers_cannot_crowd_the_starters_token_out_of_a_fill(
    glance: GlanceStandin, imgcache_factory: ImgcacheFactory
) -> None:
    """Every header but a short list counts as "credentials", so ONE allowed user sending
    MAX_KEPT_CALLERS requests that differ only in a junk header fills every slot of the
    fill's AllowedCallers with its one token; revoking that token (any user may revoke its
    own) then makes the next resume fail for everyone, the still-valid starter included."""
    imgcache = await imgcache_factory(retry_backoff="0.1s")
    joiners = [{"X-Auth-Token": OTHER_TOKEN, "X-Pad": str(i)} for i in range(MAX_KEPT_CALLERS)]
    await _crowd_out(glance, imgcache, joiners, {OTHER_TOKEN})


async def test_control_one_joiner_fewer_leaves_the_starter_in_and_its_download_whole(
    glance: GlanceStandin, imgcache_factory: ImgcacheFactory
) -> None:
    """Control for the two tests around it: with MAX_KEPT_CALLERS - 1
    padded joiners the starter's token is still kept, and the resume goes on with it."""
    imgcache = await imgcache_factory(retry_backoff="0.1s")
    joiners = [{"X-Auth-Token": OTHER_TOKEN, "X-Pad": str(i)}
               for i in range(MAX_KEPT_CALLERS - 1)]
    await _crowd_out(glance, imgcache, joiners, {OTHER_TOKEN})


async def test_eight_joiners_refused_later_do_not_fail_a_fill_whose_starter_is_allowed(
    glance: GlanceStandin, imgcache_factory: ImgcacheFactory
) -> None:
    """The ordinary case of the same limit: MAX_KEPT_CALLERS users of a project the image
    was shared with join; the share is withdrawn (Glance refuses their tokens from then
    on); the owner's starter download must go on with the owner's token."""
    imgcache = await imgcache_factory(retry_backoff="0.1s")
    tokens = {f"token-shared-{i}" for i in range(MAX_KEPT_CALLERS)}
    glance.tokens |= tokens
    await _crowd_out(glance, imgcache, [{"X-Auth-Token": t} for t in sorted(tokens)], tokens)


async def test_a_callers_conditional_headers_never_reach_the_fills_data_get(
    glance: GlanceStandin, imgcache: Imgcache
) -> None:
    """The fill is everyone's download: one caller's If-None-Match / If-Modified-Since /
    If-Match / If-Unmodified-Since (which authorize.DATA_REQUEST_HEADERS already keeps off
    the questions) must not go on the fill's data GET, where an [upstream] proxy or any
    cache in front of Glance may answer 304/412 and fail the fill of every joined caller."""
    image = await glance.add_image(size=MiB)
    conditional = {"If-None-Match": '"abc"', "If-Match": '"abc"',
                   "If-Modified-Since": "Sat, 01 Jan 2000 00:00:00 GMT",
                   "If-Unmodified-Since": "Sat, 01 Jan 2000 00:00:00 GMT"}
    status, _, body = await imgcache.get(image.id, headers=conditional)
    assert status == 200 and sha512(body) == image.os_hash_value
    [fill_get] = _fill_gets(glance, image.id)
    sent = {name.lower() for name, _ in fill_get.header_items}
    assert not sent & {name.lower() for name in conditional}, fill_get.header_items


# -- reloads close the window they claim to close -------------------------------------------

@pytest.fixture
async def reloadable(tmp_path: Path, glance: GlanceStandin
                     ) -> AsyncIterator[tuple[Running, dict[str, str], aiohttp.ClientSession]]:
    """imgcache in the test's loop, with the flag values it was started from (to build the
    settings of a reload) and a client session."""
    values = {"listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0",
              "upstream": glance.url, "cache_dir": str(tmp_path / "cache"), "max_size": "1G",
              "admin_socket": str(tmp_path / "admin.sock"), "decision_ttl": "60s"}
    context = running(load_settings(values, environ={}))
    served = await context.__aenter__()
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
    try:
        yield served, values, session
    finally:
        await session.close()
        await context.__aexit__(None, None, None)


async def _get(served: Running, session: aiohttp.ClientSession, image_id: str,
               token: str) -> tuple[int, str | None, bytes]:
    async with session.get(f"{served.proxy_url}/v2/images/{image_id}/file",
                           headers={"X-Auth-Token": token}) as response:
        return response.status, response.headers.get("X-Cache-Status"), await response.read()


async def _reload(served: Running, values: dict[str, str], **changes: str) -> None:
    old = load_settings(values, environ={})
    values.update(changes)
    apply_reload(served, old, load_settings(values, environ={}))


async def test_reloading_policy_check_to_download_stops_serving_metadata_only_decisions(
    glance: GlanceStandin,
    reloadable: tuple[Running, dict[str, str], aiohttp.ClientSession],
) -> None:
    """An operator who learns its download_image rule is stricter than get_image switches
    policy_check back to download and reloads: from then on Glance's download policy must
    decide at once, not after the metadata-only answers already kept expire."""
    served, values, session = reloadable
    await _reload(served, values, policy_check="metadata")
    glance.tokens.add(READER)
    image = await glance.add_image(size=MiB, owner_tokens=[TOKEN])
    image.reader_tokens.add(READER)
    assert (await _get(served, session, image.id, TOKEN))[0] == 200
    await served.services.fills.wait_idle()
    assert (await _get(served, session, image.id, READER))[:2] == (200, "HIT")
    await _reload(served, values, policy_check="download")
    status, cache_status, body = await _get(served, session, image.id, READER)
    assert (status, cache_status) == (403, None), (status, cache_status, len(body))


async def test_reloading_decision_ttl_to_zero_closes_the_window_at_once(
    glance: GlanceStandin,
    reloadable: tuple[Running, dict[str, str], aiohttp.ClientSession],
) -> None:
    """README: "decision_ttl = 0 closes it entirely". An operator reacting to a leaked
    token sets it and reloads: the revoked token is refused at once, not after the
    "allowed" answers already kept run out their old TTL."""
    served, values, session = reloadable
    image = await glance.add_image(size=MiB, owner_tokens=[TOKEN, OTHER_TOKEN])
    assert (await _get(served, session, image.id, OTHER_TOKEN))[0] == 200
    await served.services.fills.wait_idle()
    assert (await _get(served, session, image.id, OTHER_TOKEN))[:2] == (200, "HIT")
    glance.tokens.discard(OTHER_TOKEN)  # revoked in Keystone
    await _reload(served, values, decision_ttl="0s")
    status, cache_status, body = await _get(served, session, image.id, OTHER_TOKEN)
    assert (status, cache_status) == (401, None), (status, cache_status, len(body))


# -- endings that hold (controls) ------------------------------------------------------------

async def test_a_range_read_from_a_fill_that_fails_verification_ends_in_a_reset(
    glance: GlanceStandin, imgcache: Imgcache
) -> None:
    """A Range inside a growing fill whose image turns out corrupt: the range's tail is held
    until the whole image verified, so it never ends cleanly."""
    image = await glance.add_image(size=8 * MiB)
    glance.faults[image.id] = Fault(rate=8 * MiB, corrupt_at=8 * MiB - 10)
    member = asyncio.create_task(imgcache.get(image.id))
    await asyncio.sleep(0.3)
    raw = await rawhttp.raw_get(imgcache.url, f"/v2/images/{image.id}/file",
                                {"X-Auth-Token": TOKEN,
                                 "Range": "bytes=0-99"})
    assert raw.status == 206 and raw.ending == rawhttp.RESET and len(raw.body) < 100, raw
    with pytest.raises(aiohttp.ClientError):
        await member


# -- the decision window closes when Glance says the image is gone ---------------------------

async def test_a_deleted_image_is_refused_to_new_callers_and_to_remembered_ones_after_the_ttl(
    glance: GlanceStandin, imgcache_factory: ImgcacheFactory
) -> None:
    """Glance (the stand-in, as glance-api 33) answers 404 for a deleted image, which
    imgcache cannot tell from "this token may not see it": the README's decision window.
    A caller not remembered gets 404 at once, a remembered one at most decision_ttl later."""
    imgcache = await imgcache_factory(decision_ttl="2s")
    image = glance.images[await cached_with_tokens_remembered(glance, imgcache)]
    glance.images[image.id].status = "deleted"
    status, _, body = await imgcache.get(image.id, token=OTHER_TOKEN)
    assert status == 404 and len(body) < 4096
    await asyncio.sleep(2.1)
    status, headers, body = await imgcache.get(image.id, token=TOKEN)
    assert status == 404, (status, headers.get("X-Cache-Status"), len(body))


# -- the protocol: framing on a data GET, any case, pipelined ---------------------------------

def _pipelined(host: str, port: int, payload: bytes) -> bytes:
    import socket
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.sendall(payload)
        received = bytearray()
        while True:
            try:
                chunk = sock.recv(1 << 20)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            received += chunk
    return bytes(received)


async def test_a_chunked_body_on_a_data_get_smuggles_nothing_in_any_header_case(
    glance: GlanceStandin, imgcache: Imgcache
) -> None:
    """A data GET with a lower-case ``transfer-encoding: chunked`` body that holds a whole
    second request (for another image, with another token), pipelined with a real second
    request: imgcache answers two requests, not three; Glance sees no framing header and no
    request for the smuggled image."""
    image = await glance.add_image(size=64 * 1024)
    secret = await glance.add_image(size=64 * 1024, owner_tokens=[OTHER_TOKEN])
    host, port = imgcache.url.removeprefix("http://").rsplit(":", 1)
    smuggled = (f"GET /v2/images/{secret.id}/file HTTP/1.1\r\nHost: x\r\n"
                f"X-Auth-Token: {OTHER_TOKEN}\r\n\r\n").encode()
    body = f"{len(smuggled):x}\r\n".encode() + smuggled + b"\r\n0\r\n\r\n"
    first = (f"GET /v2/images/{image.id}/file HTTP/1.1\r\nHost: x\r\nX-Auth-Token: {TOKEN}\r\n"
             f"transfer-encoding: chunked\r\n\r\n").encode() + body
    second = (f"GET /v2/images HTTP/1.1\r\nHost: x\r\nX-Auth-Token: {TOKEN}\r\n"
              f"Connection: close\r\n\r\n").encode()
    received = await asyncio.to_thread(_pipelined, host, int(port), first + second)
    assert received.count(b"HTTP/1.1 ") == 2, received.count(b"HTTP/1.1 ")
    assert received.startswith(b"HTTP/1.1 200"), received[:200]
    assert secret.id not in [r.path.split("/")[3] for r in glance.requests
                             if r.path.startswith("/v2/images/")]
    for logged in glance.requests:
        names = {name.lower() for name, _ in logged.header_items}
        assert not names & {"content-length", "transfer-encoding", "expect"}, logged


# -- endings: a whole image that no one verified ---------------------------------------------

async def test_a_bypassed_range_answered_with_the_whole_corrupt_image_never_ends_cleanly(
    glance: GlanceStandin, imgcache_factory: ImgcacheFactory
) -> None:
    """An image above the cap is BYPASS; a Range on it is passed through unverified (the
    README says so: a range cannot be checked). But a store that answers a Range with the
    whole image (the stand-in's ignore_range, which test_trust plays too) makes that a 200
    of the WHOLE image: passed through as it comes, a corrupt byte included, and ended
    cleanly. A whole image must be verified (or the response reset), whatever was asked."""
    imgcache = await imgcache_factory(max_size="2M")
    image = await glance.add_image(size=4 * MiB)
    glance.faults[image.id] = Fault(ignore_range=True, corrupt_at=4 * MiB - 100)
    raw = await rawhttp.raw_get(imgcache.url, f"/v2/images/{image.id}/file",
                                {"X-Auth-Token": TOKEN, "Range": "bytes=0-99"})
    whole_and_wrong = (raw.status == 200 and len(raw.body) == image.size
                       and sha512(raw.body) != image.os_hash_value)
    assert not (whole_and_wrong and raw.ending == rawhttp.COMPLETE), (
        raw.status, raw.headers.get("x-cache-status"), len(raw.body), raw.ending)
