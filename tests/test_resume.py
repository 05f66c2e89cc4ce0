"""Broken upstream transfers heal: retried, resumed where they broke, verified whole."""

from __future__ import annotations

import hashlib
import random

import aiohttp
import pytest
from inloop import TOKEN, ImgcacheFactory, storm
from netlink.link import Network

from imgcache.standin import Fault, GlanceStandin

MiB = 1 << 20


def sha512(data: bytes) -> str:
    return hashlib.sha512(data).hexdigest()


@pytest.mark.parametrize(("fault", "how", "data_gets"), [
    (Fault(reset_at=3 * MiB + 5, times=1), "range", 2),
    # reset, then 400 to the Range (like an rbd store), then a full GET whose start is skipped
    (Fault(reset_at=3 * MiB + 5, times=2, ranges_supported=False), "restart", 3),
    (Fault(stall_at=2 * MiB, stall_seconds=5, times=1), "range", 2),
])
async def test_a_broken_transfer_resumes_and_clients_see_only_a_pause(
    glance: GlanceStandin, imgcache_factory: ImgcacheFactory, fault: Fault, how: str,
    data_gets: int,
) -> None:
    imgcache = await imgcache_factory(retry_backoff="0.1s", read_timeout="1s")
    image = await glance.add_image(size=8 * MiB)
    fault.rate = 16 * MiB
    glance.faults[image.id] = fault
    bodies = await storm(imgcache, image.id)
    assert {sha512(body) for body in bodies} == {image.os_hash_value}
    assert glance.data_gets(image.id) == data_gets
    await imgcache.wait_for_metric('imgcache_fills_total{outcome="committed"}', 1)
    metrics = await imgcache.metrics()
    assert metrics[f'imgcache_fill_resumes_total{{how="{how}"}}'] == 1
    resumed = [r for r in glance.requests if r.path.endswith("/file")][-1]
    if how == "range":
        broke_at = int(resumed.headers["Range"].removeprefix("bytes=").split("-")[0])
        assert 0 < broke_at <= (fault.reset_at or fault.stall_at or 0)
        assert resumed.status == 206
        assert resumed.body_bytes_sent == image.size - broke_at
    else:
        assert "Range" not in resumed.headers
        assert resumed.status == 200  # downloaded again from 0, the start skipped
    _, headers, body = await imgcache.get(image.id)
    assert headers["X-Cache-Status"] == "HIT" and sha512(body) == image.os_hash_value


async def test_a_5xx_is_retried(glance: GlanceStandin, imgcache_factory: ImgcacheFactory) -> None:
    imgcache = await imgcache_factory(retry_backoff="0.1s")
    image = await glance.add_image(size=2 * MiB)
    glance.faults[image.id] = Fault(status=503, times=2)
    bodies = await storm(imgcache, image.id, clients=3)
    assert {sha512(body) for body in bodies} == {image.os_hash_value}
    assert glance.data_gets(image.id) == 3


async def test_retries_run_out_and_the_fill_fails_cleanly(
    glance: GlanceStandin, imgcache_factory: ImgcacheFactory
) -> None:
    imgcache = await imgcache_factory(retries="2", retry_backoff="0.05s")
    image = await glance.add_image(size=4 * MiB)
    glance.faults[image.id] = Fault(reset_at=MiB)  # every time
    with pytest.raises(aiohttp.ClientPayloadError):
        await imgcache.get(image.id)
    assert glance.data_gets(image.id) == 3
    await imgcache.wait_for_metric('imgcache_fills_total{outcome="upstream_error"}', 1)
    assert (await imgcache.metrics())["imgcache_cache_entries"] == 0
    assert not await imgcache.data_files()


async def test_a_retry_goes_to_the_next_upstream(
    glance: GlanceStandin, imgcache_factory: ImgcacheFactory, network: Network
) -> None:
    # Both URLs reach the same stand-in (by two names); the retry's request must use the second.
    second = glance.url.replace(network.far_host, network.far_alias)
    imgcache = await imgcache_factory(upstream=f"{glance.url},{second}",
                                      retry_backoff="0.05s")
    image = await glance.add_image(size=4 * MiB)
    glance.faults[image.id] = Fault(reset_at=2 * MiB, times=1, rate=16 * MiB)
    status, _, body = await imgcache.get(image.id, token=TOKEN)
    assert status == 200 and sha512(body) == image.os_hash_value
    hosts = [r.headers.get("Host", "") for r in glance.requests
             if r.path.endswith("/file") and r.headers.get("Range") != "bytes=0-0"]
    assert hosts[0].startswith(f"{network.far_host}:")
    assert hosts[1].startswith(f"{network.far_alias}:")


async def test_resets_at_random_offsets_all_heal(
    glance: GlanceStandin, imgcache_factory: ImgcacheFactory
) -> None:
    rng = random.Random(20261127)
    imgcache = await imgcache_factory(retry_backoff="0.05s", retries="5")
    for _ in range(5):
        image = await glance.add_image(size=4 * MiB)
        offset = rng.randrange(1, 4 * MiB)
        glance.faults[image.id] = Fault(reset_at=offset, times=1, rate=32 * MiB)
        bodies = await storm(imgcache, image.id, clients=3)
        assert {sha512(body) for body in bodies} == {image.os_hash_value}, offset
        assert glance.data_gets(image.id) == 2
