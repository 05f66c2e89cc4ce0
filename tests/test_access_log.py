"""Log lines cannot be forged by what a client sends: a request id that is not a plain
token is replaced, and an image id or a cache-API path from the URL is logged with its
spaces, quotes and control characters escaped."""

from __future__ import annotations

import asyncio
import logging
import re

import pytest
from inloop import TOKEN, Imgcache
from yarl import URL

from imgcache.keystone import caller_from_token_body
from imgcache.logs import log_safe
from imgcache.standin import GlanceStandin

REQUEST_ID = re.compile(r"req-[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


async def access_line(caplog: pytest.LogCaptureFixture) -> logging.LogRecord:
    """The one access line, written once the handler is done (after the client's last
    byte)."""
    async with asyncio.timeout(10):
        while True:
            lines = [r for r in caplog.records if r.name == "imgcache.access"
                     and r.getMessage().startswith("image request")]
            if lines:
                [line] = lines
                return line
            await asyncio.sleep(0.01)


@pytest.mark.parametrize(("given", "kept"), [
    ("req-1234", True),
    ("req-4b2c8a8e-1d6f-4c9a-9e3b-0a1b2c3d4e5f", True),
    ("req-1 image=forged result=HIT", False),
    ('"quoted"', False),
    ("x" * 129, False),
])
async def test_a_client_request_id_is_kept_only_if_it_is_a_plain_token(
    glance: GlanceStandin, imgcache: Imgcache, caplog: pytest.LogCaptureFixture,
    given: str, kept: bool,
) -> None:
    caplog.set_level(logging.INFO, "imgcache.access")
    image = await glance.add_image(size=4096)
    status, headers, _ = await imgcache.get(image.id, headers={"X-OpenStack-Request-ID": given})
    assert status == 200
    answered = headers["x-openstack-request-id"]
    assert (answered == given) is kept
    if not kept:
        assert REQUEST_ID.fullmatch(answered)
    line = await access_line(caplog)
    assert line.request_id == answered  # type: ignore[attr-defined]
    assert line.getMessage().startswith(f"image request {answered} image={image.id} result=")
    assert "forged" not in line.getMessage()
    await imgcache.wait_for_metric('imgcache_fills_total{outcome="committed"}', 1)


async def test_an_image_id_cannot_add_fields_or_lines_to_the_log(
    glance: GlanceStandin, imgcache: Imgcache, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "imgcache.access")
    # (A newline never gets this far: aiohttp's router answers such a path 404 itself.)
    url = URL(f"{imgcache.url}/v2/images/%09fake%20result=HIT%22/file", encoded=True)
    async with imgcache.session.get(url, headers={"X-Auth-Token": TOKEN}) as response:
        assert response.status == 400
    line = await access_line(caplog)
    message = line.getMessage()
    assert "\t" not in message and '"' not in message
    assert message.count("result=") == 1
    assert r"image=\x09fake\x20result\x3dHIT\x22 " in message


async def test_a_cache_api_path_cannot_forge_who_called(
    glance: GlanceStandin, imgcache: Imgcache, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "imgcache.cache_api")
    url = URL(f"{imgcache.url}/v2/cache/x%20by%20user%20admin%20(project%20p):%20204%0d",
              encoded=True)
    async with imgcache.session.delete(url) as response:  # no token
        assert response.status == 401
    [line] = [r.getMessage() for r in caplog.records if r.name == "imgcache.cache_api"]
    assert "\r" not in line and line.count(" by ") == 1
    assert line.endswith("by a caller Keystone did not identify: 401")


def test_every_unsafe_character_has_an_escape_of_its_own() -> None:
    assert log_safe("req-1.a_b:c/d%e") == "req-1.a_b:c/d%e"
    assert log_safe("a b\t\"\\") == r"a\x20b\x09\x22\x5c"
    assert log_safe("\U0001f600") == r"\U0001f600" != log_safe("\u1f60" + "0")


def test_a_keystone_name_cannot_add_to_a_log_line() -> None:
    caller = caller_from_token_body({"token": {
        "user": {"id": "u9", "name": "mallory (u9) in project demo (p9): 403\nINFO by user admin"},
        "project": {"id": "p9", "name": "demo project"}, "roles": []}})
    described = caller.describe()
    assert "\n" not in described and described.count(" in project ") == 1
    assert described.endswith(r"in project demo\x20project (p9)")
