"""Hits reuse open cache files (imgcache.openfiles), and hit recency reaches the index in
batches: what must still hold when the file under a kept fd changes, and across a restart."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import aiohttp
import pytest
from inloop import TOKEN, Imgcache, ImgcacheFactory
from processes import fd_targets

from imgcache.app import running
from imgcache.config import load_settings
from imgcache.standin import GlanceStandin, StandinImage

MiB = 1 << 20


def sha512(data: bytes) -> str:
    return hashlib.sha512(data).hexdigest()


def fds_open_on(path: Path) -> int:
    """How many fds of this process point at ``path`` (deleted or not)."""
    return sum(target.removesuffix(" (deleted)") == str(path) for target in fd_targets("self"))


async def cached(imgcache: Imgcache, image: StandinImage) -> Path:
    """Fill ``image`` into the cache; the path of its committed file."""
    status, headers, body = await imgcache.get(image.id)
    assert (status, headers["X-Cache-Status"]) == (200, "MISS")
    assert sha512(body) == image.os_hash_value
    await imgcache.wait_for_metric('imgcache_fills_total{outcome="committed"}', 1)
    [name] = await imgcache.data_files()
    return imgcache.cache_dir / "data" / name


async def eventually(condition, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(timeout):
        while not await asyncio.to_thread(condition):
            await asyncio.sleep(0.02)


async def test_hits_share_one_open_file_closed_when_evicted(
    glance: GlanceStandin, imgcache: Imgcache
) -> None:
    image = await glance.add_image(size=2 * MiB)
    path = await cached(imgcache, image)
    results = await asyncio.gather(*(imgcache.get(image.id) for _ in range(6)))
    for status, headers, body in results:
        assert (status, headers["X-Cache-Status"]) == (200, "HIT")
        assert sha512(body) == image.os_hash_value
    assert await asyncio.to_thread(fds_open_on, path) == 1
    imgcache.services.store.remove(image.id)
    await eventually(lambda: fds_open_on(path) == 0)
    status, headers, _ = await imgcache.get(image.id)
    assert (status, headers["X-Cache-Status"]) == (200, "MISS")


async def test_a_file_deleted_under_a_kept_fd_is_served_whole_then_fetched_again(
    glance: GlanceStandin, imgcache: Imgcache
) -> None:
    image = await glance.add_image(size=2 * MiB)
    path = await cached(imgcache, image)
    assert (await imgcache.get(image.id))[1]["X-Cache-Status"] == "HIT"
    await asyncio.to_thread(path.unlink)
    # The fd still reads the verified bytes: this client gets them, then the entry goes.
    status, headers, body = await imgcache.get(image.id)
    assert (status, headers["X-Cache-Status"]) == (200, "HIT")
    assert sha512(body) == image.os_hash_value
    await eventually(lambda: fds_open_on(path) == 0)  # the deleted file's space is freed
    status, headers, body = await imgcache.get(image.id)
    assert (status, headers["X-Cache-Status"]) == (200, "MISS")
    assert sha512(body) == image.os_hash_value


async def test_a_file_truncated_under_a_kept_fd_is_never_served_short(
    glance: GlanceStandin, imgcache: Imgcache
) -> None:
    image = await glance.add_image(size=2 * MiB)
    path = await cached(imgcache, image)
    assert (await imgcache.get(image.id))[1]["X-Cache-Status"] == "HIT"
    await asyncio.to_thread(os.truncate, path, MiB)
    # The headers are out before the size check: the client must see a broken transfer,
    # never a short body it could take for the image.
    with pytest.raises(aiohttp.ClientPayloadError):
        await imgcache.get(image.id)
    status, headers, body = await imgcache.get(image.id)
    assert (status, headers["X-Cache-Status"]) == (200, "MISS")
    assert sha512(body) == image.os_hash_value


async def test_hit_recency_survives_a_restart(
    glance: GlanceStandin, imgcache_factory: ImgcacheFactory, tmp_path: Path
) -> None:
    images = [await glance.add_image(size=MiB) for _ in range(4)]
    values = {"listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0",
              "upstream": glance.url, "cache_dir": str(tmp_path / "cache"),
              "max_size": "3M", "admin_socket": str(tmp_path / "admin.sock")}
    headers = {"X-Auth-Token": TOKEN}

    async def fetch(session: aiohttp.ClientSession, url: str, image: StandinImage) -> str:
        async with session.get(f"{url}/v2/images/{image.id}/file", headers=headers) as resp:
            assert resp.status == 200 and sha512(await resp.read()) == image.os_hash_value
            return resp.headers["X-Cache-Status"]

    async with aiohttp.ClientSession() as session:
        async with running(load_settings(values, environ={})) as served:
            for image in images[:3]:
                assert await fetch(session, served.proxy_url, image) == "MISS"
                await served.services.fills.wait_idle()
            # 0 becomes the most recently used, long before its batch reaches the index.
            assert await fetch(session, served.proxy_url, images[0]) == "HIT"
        async with running(load_settings(values, environ={})) as served:
            assert await fetch(session, served.proxy_url, images[3]) == "MISS"  # evicts 1
            await served.services.fills.wait_idle()
            assert await fetch(session, served.proxy_url, images[0]) == "HIT"
            assert await fetch(session, served.proxy_url, images[2]) == "HIT"
            assert await fetch(session, served.proxy_url, images[1]) == "MISS"
