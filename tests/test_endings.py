"""Every failed transfer ends with a TCP reset, proven on the wire by a raw-socket client:
never a clean close that a client not counting bytes would take for a whole image. And the
bytes that did arrive never include the held-back tail of an image that failed its check."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
import struct
import time

import pytest
from inloop import TOKEN, Imgcache, ImgcacheFactory
from rawhttp import COMPLETE, RESET, raw_get

from imgcache.fill import HOLD_BACK_BYTES
from imgcache.standin import Fault, GlanceStandin

MiB = 1 << 20
AUTH = {"X-Auth-Token": TOKEN}


def _path(image_id: str) -> str:
    return f"/v2/images/{image_id}/file"


async def test_a_good_transfer_ends_complete_on_the_wire(
    glance: GlanceStandin, imgcache: Imgcache
) -> None:
    """The control: the raw client tells a complete body from a broken one."""
    image = await glance.add_image(size=2 * MiB)
    got = await raw_get(imgcache.url, _path(image.id), AUTH)
    assert (got.status, got.ending) == (200, COMPLETE)
    assert hashlib.sha512(got.body).hexdigest() == image.os_hash_value


@pytest.mark.parametrize("fault", [
    Fault(corrupt_at=3 * MiB, rate=8 * MiB),  # a fill whose hash does not match
    Fault(reset_at=2 * MiB, rate=8 * MiB),  # Glance breaking off, no retries left
])
async def test_a_failed_fill_resets_its_readers(
    glance: GlanceStandin, imgcache_factory: ImgcacheFactory, fault: Fault
) -> None:
    imgcache = await imgcache_factory(retries="0")
    image = await glance.add_image(size=4 * MiB)
    glance.faults[image.id] = fault
    results = await asyncio.gather(*(raw_get(imgcache.url, _path(image.id), AUTH)
                                     for _ in range(3)))
    for got in results:
        assert (got.status, got.ending) == (200, RESET), got.headers
        assert len(got.body) <= image.size - HOLD_BACK_BYTES


@pytest.mark.parametrize("fault", [
    Fault(corrupt_at=5 * MiB),  # a wrong byte: held back, then a reset
    Fault(reset_at=2 * MiB),  # Glance breaking off, no retries left
])
async def test_a_failed_download_streamed_through_resets_the_client(
    glance: GlanceStandin, imgcache_factory: ImgcacheFactory, fault: Fault
) -> None:
    imgcache = await imgcache_factory(max_size="1M", retries="0")  # too big: BYPASS
    image = await glance.add_image(size=6 * MiB)
    glance.faults[image.id] = fault
    got = await raw_get(imgcache.url, _path(image.id), AUTH)
    assert (got.status, got.headers["x-cache-status"], got.ending) == (200, "BYPASS", RESET)
    assert len(got.body) <= image.size - HOLD_BACK_BYTES


async def test_a_range_streamed_through_that_breaks_resets_the_client(
    glance: GlanceStandin, imgcache_factory: ImgcacheFactory
) -> None:
    imgcache = await imgcache_factory(max_size="1M")  # a range of an uncached image
    image = await glance.add_image(size=6 * MiB)
    glance.faults[image.id] = Fault(reset_at=MiB)
    got = await raw_get(imgcache.url, _path(image.id), {**AUTH, "Range": "bytes=0-"})
    assert (got.status, got.ending) == (206, RESET)


async def test_a_cached_file_found_short_resets_the_client(
    glance: GlanceStandin, imgcache: Imgcache
) -> None:
    image = await glance.add_image(size=4 * MiB)
    assert (await imgcache.get(image.id))[0] == 200
    await imgcache.wait_for_metric('imgcache_fills_total{outcome="committed"}', 1)
    # A hit keeps the file open; truncated under that fd, it is found short when sent.
    assert (await imgcache.get(image.id))[1]["X-Cache-Status"] == "HIT"
    [name] = await imgcache.data_files()
    await asyncio.to_thread(os.truncate, imgcache.cache_dir / "data" / name, MiB)
    got = await raw_get(imgcache.url, _path(image.id), AUTH)
    assert (got.status, got.ending) == (200, RESET)
    assert len(got.body) < image.size


def _leave_while_the_server_waits_to_write(url: str, path: str) -> None:
    """Read a little of the response, stop reading until the server's buffers are full and
    it waits for the socket, then leave with a reset (SO_LINGER 0)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.settimeout(30)
    sock.connect((host, int(port)))
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}",
             *(f"{k}: {v}" for k, v in AUTH.items()), "", ""]
    sock.sendall("\r\n".join(lines).encode())
    received = 0
    while received < 256 * 1024:
        received += len(sock.recv(64 * 1024))
    time.sleep(1.0)  # the server fills its buffers and waits to write more
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def test_a_client_leaving_while_a_stream_through_waits_to_write_is_routine(
    glance: GlanceStandin, imgcache_factory: ImgcacheFactory,
    caplog: pytest.LogCaptureFixture
) -> None:
    """aiohttp ends a write waiting for a socket whose peer reset with ConnectionError, not
    ConnectionResetError: the handler takes it as the client gone (499), and nothing
    escapes to aiohttp, which would log the handler as failed."""
    caplog.set_level(logging.INFO)
    imgcache = await imgcache_factory(max_size="1M")  # too big: BYPASS, streamed through
    image = await glance.add_image(size=64 * MiB)
    await asyncio.to_thread(_leave_while_the_server_waits_to_write, imgcache.url,
                            _path(image.id))
    for _ in range(100):
        answered = [r for r in caplog.records if r.name == "imgcache.access"
                    and getattr(r, "image_id", None) == image.id]
        if answered:
            break
        await asyncio.sleep(0.05)
    assert [(r.result, r.status) for r in answered] == [("BYPASS", 499)]
    assert not [r for r in caplog.records if "Error handling request" in r.getMessage()]
