"""The cache disk failing under imgcache: full, removed, read-only. Clients still get their
images (streamed from Glance), nothing partial is kept, and the server keeps serving."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from inloop import ImgcacheFactory

from imgcache.standin import Fault, GlanceStandin

MiB = 1 << 20


def sha512(data: bytes) -> str:
    return hashlib.sha512(data).hexdigest()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 12 MiB tmpfs for the cache directory (mounting needs root, as CI has)."""
    mountpoint = tmp_path / "small-disk"
    mountpoint.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12M", "tmpfs",
                              str(mountpoint)], capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield mountpoint
    subprocess.run(["umount", "-l", str(mountpoint)], check=False)


async def test_disk_full_during_a_fill_still_serves_every_client(
    glance: GlanceStandin, imgcache_factory: ImgcacheFactory, small_disk: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, "imgcache")
    # A cap larger than the disk: the operator got it wrong; the disk fills mid-way.
    imgcache = await imgcache_factory(cache_dir=str(small_disk / "cache"), max_size="1G")
    image = await glance.add_image(size=24 * MiB)
    glance.faults[image.id] = Fault(rate=32 * MiB)
    results = await asyncio.gather(*(imgcache.get(image.id) for _ in range(4)))
    for status, _, body in results:
        assert status == 200
        assert sha512(body) == image.os_hash_value
    metrics = await imgcache.metrics()
    assert metrics['imgcache_fills_total{outcome="disk_error"}'] == 1
    assert metrics["imgcache_disk_errors_total"] == 1
    assert metrics["imgcache_cache_entries"] == 0
    assert any("No space left on device" in r.getMessage() for r in caplog.records)
    # Caching pauses: the next request streams through.
    status, headers, body = await imgcache.get(image.id)
    assert (status, headers["X-Cache-Status"]) == (200, "BYPASS")
    assert sha512(body) == image.os_hash_value
    partial = await asyncio.to_thread(lambda: list((small_disk / "cache" / "partial").iterdir()))
    assert partial == []


async def test_cache_directory_removed_while_serving(
    glance: GlanceStandin, imgcache_factory: ImgcacheFactory, tmp_path: Path
) -> None:
    imgcache = await imgcache_factory()
    cached = await glance.add_image(size=2 * MiB)
    assert (await imgcache.get(cached.id))[0] == 200
    await imgcache.wait_for_metric('imgcache_fills_total{outcome="committed"}', 1)
    await asyncio.to_thread(shutil.rmtree, imgcache.cache_dir / "data")
    await asyncio.to_thread(shutil.rmtree, imgcache.cache_dir / "partial")
    # The cached file is gone: a clean miss, which cannot be cached: streamed through.
    status, headers, body = await imgcache.get(cached.id)
    assert status == 200 and sha512(body) == cached.os_hash_value
    assert headers["X-Cache-Status"] == "BYPASS"
    fresh = await glance.add_image(size=2 * MiB)
    status, headers, body = await imgcache.get(fresh.id)
    assert (status, headers["X-Cache-Status"]) == (200, "BYPASS")
    assert sha512(body) == fresh.os_hash_value
    metrics = await imgcache.metrics()
    assert metrics["imgcache_disk_errors_total"] >= 1
    assert metrics["imgcache_cache_entries"] == 0


async def test_cache_directory_read_only_while_serving(
    glance: GlanceStandin, imgcache_factory: ImgcacheFactory
) -> None:
    imgcache = await imgcache_factory()
    cached = await glance.add_image(size=MiB)
    assert (await imgcache.get(cached.id))[0] == 200
    await imgcache.wait_for_metric('imgcache_fills_total{outcome="committed"}', 1)
    cache = str(imgcache.cache_dir)
    # A read-only bind mount of the cache directory over itself: new writes fail (EROFS).
    bound = await asyncio.to_thread(subprocess.run, ["mount", "--bind", cache, cache],
                                    capture_output=True, text=True, check=False)
    if bound.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {bound.stderr.strip()}")
    try:
        await asyncio.to_thread(subprocess.run, ["mount", "-o", "remount,bind,ro", cache],
                                check=True)
        status, headers, body = await imgcache.get(cached.id)
        assert (status, headers["X-Cache-Status"]) == (200, "HIT")  # reads still work
        fresh = await glance.add_image(size=MiB)
        for _ in range(2):
            status, headers, body = await imgcache.get(fresh.id)
            assert status == 200 and sha512(body) == fresh.os_hash_value
            assert headers["X-Cache-Status"] == "BYPASS"
        assert (await imgcache.metrics())["imgcache_disk_errors_total"] == 1
    finally:
        # Lazy: imgcache keeps the hit file open (its open-file cache), so the mount is busy.
        await asyncio.to_thread(subprocess.run, ["umount", "--lazy", cache], check=True)
