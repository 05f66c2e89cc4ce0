"""The cache disk failing under imgcache: full, removed, read-only. Clients still get their
images (streamed from Glance), nothing partial is kept, and the server keeps serving."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from inloop import TOKEN, ImgcacheFactory
from rawhttp import RESET, raw_get

from imgcache.fill import HOLD_BACK_BYTES
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


async def test_disk_full_then_a_wrong_byte_from_glance_resets_every_client(
    glance: GlanceStandin, imgcache_factory: ImgcacheFactory, small_disk: Path,
) -> None:
    """The rest of each response comes from Glance after the disk filled: it is verified
    like any other path (the bytes already sent included), so a flipped byte resets."""
    imgcache = await imgcache_factory(cache_dir=str(small_disk / "cache"), max_size="1G")
    image = await glance.add_image(size=24 * MiB)
    # The fill's own download is left alone; every later one flips a byte at 20 MiB.
    glance.faults[image.id] = Fault(rate=32 * MiB, skip=1, corrupt_at=20 * MiB)
    results = await asyncio.gather(*(raw_get(imgcache.url, f"/v2/images/{image.id}/file",
                                             {"X-Auth-Token": TOKEN}) for _ in range(4)))
    for got in results:
        assert (got.status, got.ending) == (200, RESET)
        assert len(got.body) <= image.size - HOLD_BACK_BYTES
    metrics = await imgcache.metrics()
    assert metrics['imgcache_fills_total{outcome="disk_error"}'] == 1
    assert metrics["imgcache_checksum_failures_total"] == 4


def _commit_of(metrics: dict[str, float]) -> tuple[float, float]:
    return (metrics['imgcache_fills_total{outcome="commit_error"}'],
            metrics['imgcache_fills_total{outcome="committed"}'])


async def test_a_rename_failing_at_commit_leaks_nothing(
    glance: GlanceStandin, imgcache_factory: ImgcacheFactory
) -> None:
    imgcache = await imgcache_factory()
    image = await glance.add_image(size=8 * MiB)
    glance.faults[image.id] = Fault(rate=16 * MiB)
    download = asyncio.create_task(imgcache.get(image.id))
    await asyncio.sleep(0.2)
    data = imgcache.cache_dir / "data"
    # data/ becomes a regular file: the commit's rename fails (ENOTDIR).
    await asyncio.to_thread(lambda: (data.rmdir(), data.write_bytes(b"not a directory")))
    status, _, body = await download
    assert status == 200 and sha512(body) == image.os_hash_value  # verified before commit
    await imgcache.services.fills.wait_idle()
    metrics = await imgcache.metrics()
    assert _commit_of(metrics) == (1, 0)
    assert metrics["imgcache_cache_bytes"] == 0 and metrics["imgcache_cache_entries"] == 0
    assert await asyncio.to_thread(lambda: list((imgcache.cache_dir / "partial").iterdir())) \
        == []
    assert metrics["imgcache_disk_errors_total"] == 1  # caching pauses, as after any write


async def test_the_index_failing_at_commit_with_a_database_error_leaks_nothing(
    glance: GlanceStandin, imgcache_factory: ImgcacheFactory, small_disk: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """SQLite answers "database or disk is full" (sqlite3.OperationalError, not an OSError)
    when the index write of a commit finds the disk full: the file already renamed into
    data/ is taken out again, the reservation given back, and the fill counted as failed."""
    cache = small_disk / "cache"
    imgcache = await imgcache_factory(cache_dir=str(cache), max_size="1G")
    size = 6 * MiB
    image = await glance.add_image(size=size)
    # Glance pauses 1 MiB before the end: the disk is filled up to exactly that MiB then.
    glance.faults[image.id] = Fault(stall_at=size - MiB, stall_seconds=1.5)
    download = asyncio.create_task(imgcache.get(image.id))
    fill = await _wait_for_fill(imgcache)
    while fill.written < size - MiB:
        await asyncio.sleep(0.02)
    await asyncio.to_thread(_fill_disk_leaving, small_disk, MiB)
    status, _, body = await download
    assert status == 200 and sha512(body) == image.os_hash_value
    await imgcache.services.fills.wait_idle()
    metrics = await imgcache.metrics()
    assert _commit_of(metrics) == (1, 0)
    assert any("writing the index record: database or disk is full" in r.getMessage()
               for r in caplog.records)
    assert metrics["imgcache_cache_bytes"] == 0 and metrics["imgcache_cache_entries"] == 0
    await asyncio.sleep(0.2)  # the file taken out of data/ is unlinked in the background
    assert await imgcache.data_files() == []
    # The server keeps serving (streamed through while caching pauses).
    status, headers, body = await imgcache.get(image.id)
    assert (status, headers["X-Cache-Status"]) == (200, "BYPASS")


async def _wait_for_fill(imgcache: object) -> object:
    async with asyncio.timeout(10):
        while not imgcache.services.fills.in_flight():
            await asyncio.sleep(0.01)
    return imgcache.services.fills.in_flight()[0]


def _fill_disk_leaving(mountpoint: Path, left: int) -> None:
    """Write a ballast file so that exactly ``left`` bytes stay free on the filesystem."""
    stat = os.statvfs(mountpoint)
    free = stat.f_bavail * stat.f_frsize
    with (mountpoint / "ballast").open("wb") as ballast:
        ballast.write(b"\0" * (free - left))
