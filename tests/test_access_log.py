"""The access log line cannot be forged by what a client sends: a request id that is not a
plain token is replaced, and an image id from the URL is logged with its spaces, quotes and
other control characters escaped."""

from __future__ import annotations

import asyncio
import logging
import re

import pytest
from inloop import TOKEN, Imgcache
from yarl import URL

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
