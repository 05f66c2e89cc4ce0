"""The image-data path end to end: a real imgcache app in front of the Glance stand-in."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time

import aiohttp
import pytest
from inloop import OTHER_TOKEN, TOKEN, Imgcache, ImgcacheFactory

from imgcache import fill
from imgcache.standin import Fault, GlanceStandin

MiB = 1 << 20


def sha512(data: bytes) -> str:
    return hashlib.sha512(data).hexdigest()


async def test_the_first_bytes_on_disk_reach_a_waiting_client_at_once(
    glance: GlanceStandin, imgcache: Imgcache, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With the periodic wake-up of waiting readers pushed out of reach, and an image smaller
    # than the bytes that wake them, only the announcement of the first bytes written lets
    # the client start before the download (about 2 s) is over.
    monkeypatch.setattr(fill, "ANNOUNCE_SECONDS", 3600.0)
    image = await glance.add_image(size=8 * MiB)
    assert image.size < fill.ANNOUNCE_BYTES
    glance.faults[image.id] = Fault(rate=4 * MiB)
    headers = {"X-Auth-Token": TOKEN}
    async with imgcache.session.get(imgcache.data_url(image.id), headers=headers) as resp:
        body = bytearray(await resp.content.readany())
        # Glance is still sending: the client did not wait for the whole download.
        assert (await imgcache.metrics())["imgcache_upstream_bytes_total"] < image.size / 2
        body += await resp.read()
    assert sha512(bytes(body)) == image.os_hash_value


async def test_cold_storm_is_one_upstream_get_and_followers_stream_early(
    glance: GlanceStandin, imgcache: Imgcache
) -> None:
    image = await glance.add_image(size=8 * MiB)
    # Trickle the upstream so that the fill lasts about 2 s.
    glance.faults[image.id] = Fault(rate=4 * MiB)
    first_byte: list[float] = []
    headers = {"X-Auth-Token": TOKEN}

    async def client() -> tuple[int, str, bytes]:
        async with imgcache.session.get(imgcache.data_url(image.id), headers=headers) as resp:
            body = bytearray()
            async for chunk in resp.content.iter_any():
                if not body:
                    first_byte.append(time.monotonic())
                body += chunk
            return resp.status, resp.headers["X-Cache-Status"], bytes(body)

    results = await asyncio.gather(*(client() for _ in range(32)))
    fill_end = time.monotonic()

    assert glance.data_gets(image.id) == 1
    assert all(status == 200 for status, _, _ in results)
    assert {sha512(body) for _, _, body in results} == {image.os_hash_value}
    statuses = sorted(cache_status for _, cache_status, _ in results)
    assert statuses == ["COALESCED"] * 31 + ["MISS"]
    # Every client had bytes long before the fill (about 2 s) ended.
    assert len(first_byte) == 32
    assert max(first_byte) < fill_end - 1.0
    await imgcache.wait_for_metric('imgcache_fills_total{outcome="committed"}', 1)
    status, response_headers, body = await imgcache.get(image.id)
    assert (status, response_headers["X-Cache-Status"]) == (200, "HIT")
    assert sha512(body) == image.os_hash_value
    # A request is counted once its handler returns, which may be just after the client
    # read its last byte.
    await imgcache.wait_for_metric('imgcache_requests_total{result="hit"}', 1)
    metrics = await imgcache.metrics()
    assert metrics['imgcache_requests_total{result="coalesced"}'] == 31
    assert metrics['imgcache_requests_total{result="hit"}'] == 1
    assert metrics["imgcache_upstream_bytes_total"] == image.size
    assert metrics['imgcache_verifications_total{method="os_hash"}'] == 1


async def test_response_headers_are_glances_plus_cache_status(
    glance: GlanceStandin, imgcache: Imgcache
) -> None:
    image = await glance.add_image(size=MiB)
    async with imgcache.session.get(f"{glance.url}/v2/images/{image.id}/file",
                                    headers={"X-Auth-Token": TOKEN}) as resp:
        glance_headers = resp.headers
        await resp.read()
    status, headers, _ = await imgcache.get(image.id)
    assert status == 200
    for name in ("Content-Type", "Content-Length", "Content-MD5"):
        assert headers[name] == glance_headers[name]
    assert headers["Content-Type"] == "application/octet-stream"
    assert headers["X-Cache-Status"] == "MISS"
    assert "Content-Range" not in headers


async def test_first_client_leaving_does_not_cancel_the_fill(
    glance: GlanceStandin, imgcache: Imgcache
) -> None:
    image = await glance.add_image(size=4 * MiB)
    glance.faults[image.id] = Fault(rate=4 * MiB)
    async with aiohttp.ClientSession() as quitter, quitter.get(imgcache.data_url(image.id),
                           headers={"X-Auth-Token": TOKEN}) as resp:
        assert resp.headers["X-Cache-Status"] == "MISS"
        await resp.content.readany()
    # The first (and only) client is gone; the fill goes on and commits.
    await imgcache.wait_for_metric('imgcache_fills_total{outcome="committed"}', 1)
    status, headers, body = await imgcache.get(image.id)
    assert (status, headers["X-Cache-Status"]) == (200, "HIT")
    assert sha512(body) == image.os_hash_value
    assert glance.data_gets(image.id) == 1


async def test_a_slow_client_slows_only_itself(glance: GlanceStandin, imgcache: Imgcache) -> None:
    image = await glance.add_image(size=16 * MiB)
    glance.faults[image.id] = Fault(rate=16 * MiB)
    slow_started = asyncio.Event()

    async def slow() -> int:
        async with imgcache.session.get(imgcache.data_url(image.id),
                                        headers={"X-Auth-Token": TOKEN}) as resp:
            await resp.content.readexactly(64 * 1024)
            slow_started.set()
            await asyncio.sleep(4)
            return len(await resp.read()) + 64 * 1024

    slow_task = asyncio.create_task(slow())
    await slow_started.wait()
    started = time.monotonic()
    status, _, body = await imgcache.get(image.id)
    fast_time = time.monotonic() - started
    assert status == 200 and sha512(body) == image.os_hash_value
    # The fast client finished while the slow one still sat on its 4 s pause.
    assert not slow_task.done()
    assert fast_time < 3.5
    assert await slow_task == image.size


@pytest.mark.parametrize(("fault", "answered"), [
    (Fault(corrupt_at=3 * MiB + 17), None),
    (Fault(reset_at=2 * MiB), None),
    (Fault(status=503), 503),
])
async def test_upstream_fault_fails_every_client_and_caches_nothing(
    glance: GlanceStandin, imgcache_factory: ImgcacheFactory, fault: Fault,
    answered: int | None,
) -> None:
    """A fault after the first bytes breaks every transfer off; one before them (Glance's
    503) is every client's answer, a status Nova retries, not a 200 cut short."""
    imgcache = await imgcache_factory(retries="0")
    image = await glance.add_image(size=4 * MiB)
    fault.rate = 8 * MiB
    fault.times = 1
    glance.faults[image.id] = fault

    async def client() -> BaseException | tuple[int, bytes]:
        try:
            async with imgcache.session.get(imgcache.data_url(image.id),
                                            headers={"X-Auth-Token": TOKEN}) as resp:
                return resp.status, await resp.read()
        except aiohttp.ClientError as exc:
            return exc

    results = await asyncio.gather(*(client() for _ in range(8)))
    if answered is None:  # no client got a complete-looking body: each transfer broke off
        assert all(isinstance(r, aiohttp.ClientPayloadError | aiohttp.ServerDisconnectedError)
                   for r in results), results
    else:
        assert all(isinstance(r, tuple) and r[0] == answered and len(r[1]) < 4096
                   for r in results), results
    await imgcache.services.fills.wait_idle()
    metrics = await imgcache.metrics()
    assert metrics["imgcache_cache_entries"] == 0
    assert metrics["imgcache_cache_bytes"] == 0
    failed = sum(v for k, v in metrics.items()
                 if k.startswith("imgcache_fills_total") and "committed" not in k)
    assert failed == 1
    if fault.corrupt_at is not None:
        assert metrics["imgcache_checksum_failures_total"] == 1
    assert not await imgcache.data_files()
    # The next request starts afresh and succeeds (the fault applied once).
    status, headers, body = await imgcache.get(image.id)
    assert (status, headers["X-Cache-Status"]) == (200, "MISS")
    assert sha512(body) == image.os_hash_value
    assert glance.data_gets(image.id) == 2


async def test_glance_decides_who_reads_cached_and_in_flight_images(
    glance: GlanceStandin, imgcache: Imgcache
) -> None:
    image = await glance.add_image(size=4 * MiB, owner_tokens=[TOKEN])
    glance.faults[image.id] = Fault(rate=2 * MiB)
    owner = asyncio.create_task(imgcache.get(image.id))
    await asyncio.sleep(0.3)  # the fill is in flight now
    status, _, body = await imgcache.get(image.id, token=OTHER_TOKEN)
    assert status == 404 and len(body) < 4096
    status, headers, _ = await imgcache.get(image.id, token=None)
    assert status == 401 and "WWW-Authenticate" in headers
    status, _, _ = await imgcache.get(image.id, token="not-a-valid-token")
    assert status == 401
    owner_status, _, owner_body = await owner
    assert owner_status == 200 and sha512(owner_body) == image.os_hash_value
    await imgcache.wait_for_metric('imgcache_fills_total{outcome="committed"}', 1)
    for token, expected in ((OTHER_TOKEN, 404), (None, 401), (TOKEN, 200)):
        status, _, body = await imgcache.get(image.id, token=token)
        assert status == expected
        if expected != 200:
            assert len(body) < 4096  # Glance's short error body, no image bytes
    ranged, _, body = await imgcache.get(image.id, token=OTHER_TOKEN,
                                         headers={"Range": "bytes=0-99"})
    assert ranged == 404
    metrics = await imgcache.metrics()
    assert metrics['imgcache_requests_total{result="denied"}'] == 6


async def test_denial_is_never_remembered_but_allowed_is_for_the_ttl(
    glance: GlanceStandin, imgcache_factory: ImgcacheFactory
) -> None:
    imgcache = await imgcache_factory(decision_ttl="30s")
    image = await glance.add_image(size=MiB, owner_tokens=[TOKEN])
    assert (await imgcache.get(image.id))[0] == 200
    await imgcache.wait_for_metric('imgcache_fills_total{outcome="committed"}', 1)
    assert (await imgcache.get(image.id, token=OTHER_TOKEN))[0] == 404
    glance.images[image.id].owner_tokens.add(OTHER_TOKEN)  # Glance now shares it
    assert (await imgcache.get(image.id, token=OTHER_TOKEN))[0] == 200
    metadata_gets = sum(1 for r in glance.requests if r.path == f"/v2/images/{image.id}")
    assert (await imgcache.get(image.id))[0] == 200  # allowed, remembered: no new GET
    assert sum(1 for r in glance.requests if r.path == f"/v2/images/{image.id}") == \
        metadata_gets


async def test_ttl_zero_asks_glance_every_time(
    glance: GlanceStandin, imgcache_factory: ImgcacheFactory
) -> None:
    imgcache = await imgcache_factory(decision_ttl="0")
    image = await glance.add_image(size=MiB, owner_tokens=[TOKEN])
    assert (await imgcache.get(image.id))[0] == 200
    await imgcache.wait_for_metric('imgcache_fills_total{outcome="committed"}', 1)
    assert (await imgcache.get(image.id))[0] == 200
    glance.images[image.id].owner_tokens.clear()  # access revoked in Glance
    status, _, body = await imgcache.get(image.id)
    assert status == 404 and len(body) < 4096


async def test_lru_eviction_keeps_the_cap(
    glance: GlanceStandin, imgcache_factory: ImgcacheFactory
) -> None:
    imgcache = await imgcache_factory(max_size="3M")
    images = [await glance.add_image(size=MiB) for _ in range(4)]
    committed = 0

    async def fetch(index: int) -> str:
        nonlocal committed
        status, headers, body = await imgcache.get(images[index].id)
        assert status == 200 and sha512(body) == images[index].os_hash_value
        if headers["X-Cache-Status"] == "MISS":
            committed += 1
            await imgcache.wait_for_metric('imgcache_fills_total{outcome="committed"}',
                                           committed)
        return headers["X-Cache-Status"]

    assert [await fetch(i) for i in (0, 1, 2)] == ["MISS"] * 3
    assert await fetch(0) == "HIT"  # 0 is now the most recently used; 1 the least
    assert await fetch(3) == "MISS"  # evicts 1
    metrics = await imgcache.metrics()
    assert metrics["imgcache_evictions_total"] == 1
    assert metrics["imgcache_cache_bytes"] <= 3 * MiB
    assert metrics["imgcache_cache_entries"] == 3
    assert [await fetch(i) for i in (0, 2, 3)] == ["HIT"] * 3
    assert await fetch(1) == "MISS"
    assert len(await imgcache.data_files()) <= 3


async def test_an_image_larger_than_the_cap_is_streamed_through(
    glance: GlanceStandin, imgcache_factory: ImgcacheFactory
) -> None:
    imgcache = await imgcache_factory(max_size="2M")
    image = await glance.add_image(size=3 * MiB)
    for _ in range(2):
        status, headers, body = await imgcache.get(image.id)
        assert (status, headers["X-Cache-Status"]) == (200, "BYPASS")
        assert sha512(body) == image.os_hash_value
    metrics = await imgcache.metrics()
    assert metrics["imgcache_cache_entries"] == 0
    assert metrics['imgcache_requests_total{result="bypass"}'] == 2
    assert glance.data_gets(image.id) == 2


async def test_an_image_without_data_passes_through_to_glance(
    glance: GlanceStandin, imgcache: Imgcache
) -> None:
    image = await glance.add_image(size=MiB, status="queued")
    status, _, body = await imgcache.get(image.id)
    assert status == 204 and body == b""
    image_deactivated = await glance.add_image(size=MiB, status="deactivated")
    assert (await imgcache.get(image_deactivated.id))[0] == 403


@pytest.mark.parametrize(("header", "expected"), [
    ("bytes=0-99", (0, 100)),
    ("bytes=100-", (100, 2 * MiB)),
    ("bytes=-1000", (2 * MiB - 1000, 2 * MiB)),
    ("bytes=2097000-99999999", (2097000, 2 * MiB)),
])
async def test_range_on_a_hit_and_in_flight(
    glance: GlanceStandin, imgcache: Imgcache, header: str, expected: tuple[int, int]
) -> None:
    image = await glance.add_image(size=2 * MiB)
    glance.faults[image.id] = Fault(rate=2 * MiB)
    start, end = expected
    # In flight: the request waits for its bytes to be written and verified.
    status, headers, body = await imgcache.get(image.id, headers={"Range": header})
    assert status == 206 and headers["X-Cache-Status"] == "MISS"
    assert headers["Content-Range"] == f"bytes {start}-{end - 1}/{2 * MiB}"
    assert int(headers["Content-Length"]) == end - start == len(body)
    await imgcache.wait_for_metric('imgcache_fills_total{outcome="committed"}', 1)
    status, headers, hit_body = await imgcache.get(image.id, headers={"Range": header})
    assert status == 206 and headers["X-Cache-Status"] == "HIT"
    assert hit_body == body
    _, _, full = await imgcache.get(image.id)
    assert full[start:end] == body


@pytest.mark.parametrize(("header", "status"), [
    ("bytes=0-1,5-9", 400),
    ("bytes=abc", 416),
    ("bytes=5-1", 416),
    ("bytes=99999999-", 416),
    ("bytes=-0", 416),
    ("items=0-1", 416),
    ("bytes=" + "9" * 4000 + "-", 416),
])
async def test_bad_ranges(glance: GlanceStandin, imgcache: Imgcache, header: str,
                          status: int) -> None:
    image = await glance.add_image(size=MiB)
    got, headers, body = await imgcache.get(image.id, headers={"Range": header})
    assert got == status
    assert b"error" in body and headers["Content-Type"].startswith("application/json")


@pytest.mark.parametrize("raw_id", ["not-a-uuid", "..", "12345678-1234-1234-1234-12345678901",
                                    "%2e%2e%2f%2e%2e%2fetc%2fpasswd"])
async def test_non_uuid_ids_get_a_clear_4xx(imgcache: Imgcache, raw_id: str) -> None:
    url = f"{imgcache.url}/v2/images/{raw_id}/file"
    async with imgcache.session.get(url, headers={"X-Auth-Token": TOKEN}) as resp:
        assert 400 <= resp.status < 500
        await resp.read()
    assert not await imgcache.data_files()


async def test_size_only_verification_is_counted(
    glance: GlanceStandin, imgcache: Imgcache
) -> None:
    image = await glance.add_image(size=MiB, hash_algo=None, checksum=False)
    status, headers, body = await imgcache.get(image.id)
    assert status == 200 and "Content-MD5" not in headers and len(body) == MiB
    await imgcache.wait_for_metric('imgcache_verifications_total{method="size_only"}', 1)


async def test_md5_checksum_is_used_without_os_hash(
    glance: GlanceStandin, imgcache: Imgcache
) -> None:
    image = await glance.add_image(size=MiB, hash_algo=None)
    glance.faults[image.id] = Fault(corrupt_at=10, times=1)
    with pytest.raises(aiohttp.ClientPayloadError):
        await imgcache.get(image.id)
    await imgcache.wait_for_metric("imgcache_checksum_failures_total", 1)
    status, _, body = await imgcache.get(image.id)
    assert status == 200 and hashlib.md5(body).hexdigest() == image.checksum
    await imgcache.wait_for_metric('imgcache_verifications_total{method="checksum"}', 1)


async def test_metadata_size_disagreeing_with_the_body_caches_nothing(
    glance: GlanceStandin, imgcache: Imgcache
) -> None:
    image = await glance.add_image(size=MiB)
    glance.images[image.id].meta_size = MiB - 10
    with pytest.raises(aiohttp.ClientPayloadError):
        await imgcache.get(image.id)
    await imgcache.wait_for_metric('imgcache_fills_total{outcome="size_mismatch"}', 1)
    assert (await imgcache.metrics())["imgcache_cache_entries"] == 0


async def test_a_truncated_cache_file_is_never_served(
    glance: GlanceStandin, imgcache: Imgcache
) -> None:
    image = await glance.add_image(size=2 * MiB)
    assert (await imgcache.get(image.id))[0] == 200
    await imgcache.wait_for_metric('imgcache_fills_total{outcome="committed"}', 1)
    [name] = await imgcache.data_files()
    await asyncio.to_thread(os.truncate, imgcache.cache_dir / "data" / name, MiB)
    status, headers, body = await imgcache.get(image.id)
    assert status == 200 and headers["X-Cache-Status"] == "MISS"
    assert sha512(body) == image.os_hash_value


async def test_a_client_leaving_a_download_streamed_through_is_not_glance_failing(
    glance: GlanceStandin, imgcache_factory: ImgcacheFactory
) -> None:
    """The client going away ends its stream from Glance; it is not retried, resumed or
    counted as Glance breaking off."""
    imgcache = await imgcache_factory(max_size="1M", retry_backoff="0.05s")  # BYPASS
    image = await glance.add_image(size=8 * MiB)
    glance.faults[image.id] = Fault(rate=8 * MiB)
    async with imgcache.session.get(imgcache.data_url(image.id),
                                    headers={"X-Auth-Token": TOKEN}) as response:
        assert response.headers["X-Cache-Status"] == "BYPASS"
        await response.content.readexactly(MiB)
        response.close()
    await asyncio.sleep(0.5)
    assert glance.data_gets(image.id) == 1
    metrics = await imgcache.metrics()
    assert metrics['imgcache_upstream_errors_total{kind="broken"}'] == 0
    assert metrics['imgcache_fill_resumes_total{how="range"}'] == 0
