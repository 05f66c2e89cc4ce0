"""Glance's download policy decides every read, and no download depends on one caller.

The stand-in plays Glance's default policy for a project reader (``reader_tokens``: may see
an image, may not download it: 403), and stores that cannot serve or that ignore ranges.
Each test is named after the promise it protects."""

from __future__ import annotations

import asyncio
import hashlib

import pytest
from inloop import OTHER_TOKEN, TOKEN, Imgcache, ImgcacheFactory

from imgcache.standin import Fault, GlanceStandin
from imgcache.upstream import end_to_end_headers, upstream_headers

MiB = 1 << 20
READER = "token-reader"


def sha512(data: bytes) -> str:
    return hashlib.sha512(data).hexdigest()


@pytest.fixture
async def reader_glance(glance: GlanceStandin) -> GlanceStandin:
    """The stand-in with a third valid token, a project reader of the images it is given."""
    glance.tokens.add(READER)
    return glance


async def _reader_image(glance: GlanceStandin, size: int = 4 * MiB) -> object:
    image = await glance.add_image(size=size, owner_tokens=[TOKEN, OTHER_TOKEN])
    image.reader_tokens.add(READER)
    return image


def _assert_refused(status: int, headers: dict[str, str], body: bytes, image_bytes: bytes,
                    expected: int = 403) -> None:
    assert status == expected, (status, body[:200])
    assert "X-Cache-Status" not in headers
    assert len(body) < 4096 and image_bytes[:64] not in body


async def test_a_reader_glance_refuses_downloads_gets_403_cold_in_flight_cached_ranged(
    reader_glance: GlanceStandin, imgcache: Imgcache
) -> None:
    glance = reader_glance
    image = await _reader_image(glance)
    first = await asyncio.to_thread(image.path.read_bytes)
    # Cold: the reader is refused and starts nothing.
    _assert_refused(*await imgcache.get(image.id, token=READER), first)
    assert glance.data_gets(image.id) == 0
    assert imgcache.services.fills.in_flight() == []
    # In flight, beside a member: the member gets every byte, the reader none.
    glance.faults[image.id] = Fault(rate=4 * MiB)
    member = asyncio.create_task(imgcache.get(image.id))
    await asyncio.sleep(0.3)
    assert len(imgcache.services.fills.in_flight()) == 1
    _assert_refused(*await imgcache.get(image.id, token=READER), first)
    _assert_refused(*await imgcache.get(image.id, token=READER,
                                        headers={"Range": "bytes=0-99"}), first)
    status, headers, body = await member
    assert (status, headers["X-Cache-Status"]) == (200, "MISS")
    assert sha512(body) == image.os_hash_value
    await imgcache.wait_for_metric('imgcache_fills_total{outcome="committed"}', 1)
    # Cached: a HIT for a member, 403 for the reader, whole or ranged.
    assert (await imgcache.get(image.id, token=OTHER_TOKEN))[1]["X-Cache-Status"] == "HIT"
    _assert_refused(*await imgcache.get(image.id, token=READER), first)
    _assert_refused(*await imgcache.get(image.id, token=READER,
                                        headers={"Range": "bytes=-10"}), first)
    metrics = await imgcache.metrics()
    assert metrics['imgcache_requests_total{result="denied"}'] == 5
    assert glance.data_gets(image.id) == 1


async def test_a_refused_caller_asking_first_never_starts_or_aborts_a_fill(
    reader_glance: GlanceStandin, imgcache: Imgcache
) -> None:
    glance = reader_glance
    image = await _reader_image(glance)
    glance.faults[image.id] = Fault(rate=8 * MiB)
    first = await asyncio.to_thread(image.path.read_bytes)
    # The reader and three members arrive at once, the reader first.
    reader = asyncio.create_task(imgcache.get(image.id, token=READER))
    await asyncio.sleep(0)
    members = [asyncio.create_task(imgcache.get(image.id, token=t))
               for t in (TOKEN, OTHER_TOKEN, TOKEN)]
    _assert_refused(*await reader, first)
    for status, _, body in await asyncio.gather(*members):
        assert status == 200 and sha512(body) == image.os_hash_value
    assert glance.data_gets(image.id) == 1
    await imgcache.wait_for_metric('imgcache_fills_total{outcome="committed"}', 1)
    # The fill downloaded with a member's token: the reader's never reached a data GET
    # other than its download check.
    fill_gets = [r for r in glance.requests if r.path.endswith("/file")
                 and r.headers.get("Range") != "bytes=0-0"]
    assert [r.headers["X-Auth-Token"] for r in fill_gets] != [READER]
    assert all(r.headers["X-Auth-Token"] != READER for r in fill_gets)


async def test_a_fill_goes_on_with_another_allowed_callers_token_when_glance_refuses_one(
    glance: GlanceStandin, imgcache_factory: ImgcacheFactory
) -> None:
    imgcache = await imgcache_factory(retry_backoff="0.2s")
    image = await glance.add_image(size=8 * MiB, owner_tokens=[TOKEN, OTHER_TOKEN])
    # The first download breaks at 3 MiB; by the time the fill resumes, the newest token it
    # holds (the joiner's, tried first) has been revoked: it goes on with the starter's.
    glance.faults[image.id] = Fault(rate=8 * MiB, reset_at=3 * MiB, times=1)
    starter = asyncio.create_task(imgcache.get(image.id, token=TOKEN))
    await asyncio.sleep(0.2)
    joiner = asyncio.create_task(imgcache.get(image.id, token=OTHER_TOKEN))
    await asyncio.sleep(0.1)
    glance.tokens.discard(OTHER_TOKEN)
    for task in (starter, joiner):
        status, _, body = await task
        assert status == 200 and sha512(body) == image.os_hash_value
    await imgcache.wait_for_metric('imgcache_fills_total{outcome="committed"}', 1)
    fill_gets = [r for r in glance.requests if r.path.endswith("/file")
                 and r.headers.get("Range") != "bytes=0-0"]
    assert [(r.headers["X-Auth-Token"], r.status) for r in fill_gets] == [
        (TOKEN, 200), (OTHER_TOKEN, 401), (TOKEN, 206)]


async def test_a_fill_whose_only_caller_is_refused_fails_cleanly_and_caches_nothing(
    glance: GlanceStandin, imgcache_factory: ImgcacheFactory
) -> None:
    imgcache = await imgcache_factory(retry_backoff="0.2s")
    image = await glance.add_image(size=8 * MiB, owner_tokens=[TOKEN])
    glance.faults[image.id] = Fault(rate=8 * MiB, reset_at=3 * MiB, times=1)
    starter = asyncio.create_task(imgcache.get(image.id, token=TOKEN))
    await asyncio.sleep(0.2)
    glance.tokens.discard(TOKEN)
    with pytest.raises(Exception) as broken:
        await starter
    assert "Payload" in type(broken.value).__name__ or "Disconnected" in type(
        broken.value).__name__, broken.value
    await imgcache.services.fills.wait_idle()
    metrics = await imgcache.metrics()
    assert metrics['imgcache_fills_total{outcome="refused"}'] == 1
    assert metrics["imgcache_cache_entries"] == 0 and metrics["imgcache_cache_bytes"] == 0
    assert not await imgcache.data_files()


@pytest.mark.parametrize("fault", [
    Fault(ranges_supported=False, checks_too=True),  # rbd, swift, s3: 400 to any Range
    Fault(ignore_range=True, checks_too=True),  # a store answering a Range with everything
])
async def test_the_download_question_is_asked_of_stores_without_ranges_and_cut_short(
    reader_glance: GlanceStandin, imgcache: Imgcache, fault: Fault
) -> None:
    glance = reader_glance
    image = await _reader_image(glance, size=16 * MiB)
    glance.faults[image.id] = fault
    first = await asyncio.to_thread(image.path.read_bytes)
    status, _, body = await imgcache.get(image.id)
    assert status == 200 and sha512(body) == image.os_hash_value
    _assert_refused(*await imgcache.get(image.id, token=READER), first)
    await imgcache.wait_for_metric('imgcache_fills_total{outcome="committed"}', 1)
    _assert_refused(*await imgcache.get(image.id, token=READER), first)
    # Every download check that Glance answered with the whole image was cut off early.
    unranged_checks = [r for r in glance.requests if r.path.endswith("/file")
                       and r.status == 200 and r.headers["X-Auth-Token"] != TOKEN]
    assert all(r.body_bytes_sent < image.size for r in glance.requests
               if r.path.endswith("/file") and r.headers["X-Auth-Token"] == READER)
    assert unranged_checks == [] or all(r.body_bytes_sent < image.size
                                        for r in unranged_checks)


async def test_policy_check_metadata_asks_only_get_image(
    reader_glance: GlanceStandin, imgcache_factory: ImgcacheFactory
) -> None:
    """The cheaper mode, for operators whose download policy is no stricter than get_image:
    no download check is made, so a reader is served (as documented)."""
    imgcache = await imgcache_factory(policy_check="metadata")
    image = await _reader_image(reader_glance)
    status, _, body = await imgcache.get(image.id)
    assert status == 200 and sha512(body) == image.os_hash_value
    await imgcache.wait_for_metric('imgcache_fills_total{outcome="committed"}', 1)
    status, headers, body = await imgcache.get(image.id, token=READER)
    assert (status, headers["X-Cache-Status"]) == (200, "HIT")
    assert reader_glance.download_checks(image.id) == 0


async def test_glance_failing_the_download_check_is_the_answer_and_serves_nothing(
    glance: GlanceStandin, imgcache: Imgcache
) -> None:
    image = await glance.add_image(size=2 * MiB)
    assert (await imgcache.get(image.id))[0] == 200
    await imgcache.wait_for_metric('imgcache_fills_total{outcome="committed"}', 1)
    glance.faults[image.id] = Fault(status=503, checks_too=True)
    status, headers, body = await imgcache.get(image.id, token=OTHER_TOKEN)
    assert status == 503 and "X-Cache-Status" not in headers and len(body) < 4096


async def test_a_metadata_reply_split_across_segments_is_read_whole(
    glance: GlanceStandin, imgcache: Imgcache
) -> None:
    glance.metadata_split_pause = 0.2
    image = await glance.add_image(size=MiB)
    status, headers, body = await imgcache.get(image.id)
    assert (status, headers["X-Cache-Status"]) == (200, "MISS")
    assert sha512(body) == image.os_hash_value


async def cached_with_tokens_remembered(glance: GlanceStandin, imgcache: Imgcache) -> str:
    """A new image, cached through TOKEN (whose "allowed" is now remembered); its id."""
    image = await glance.add_image(size=MiB, owner_tokens=[TOKEN, OTHER_TOKEN])
    assert (await imgcache.get(image.id, token=TOKEN))[0] == 200
    await imgcache.wait_for_metric('imgcache_fills_total{outcome="committed"}', 1)
    assert (await imgcache.get(image.id, token=TOKEN))[1]["X-Cache-Status"] == "HIT"
    return image.id


async def test_a_dropped_image_forgets_its_remembered_decisions(
    glance: GlanceStandin, imgcache_factory: ImgcacheFactory
) -> None:
    imgcache = await imgcache_factory(decision_ttl="60s")
    image = glance.images[await cached_with_tokens_remembered(glance, imgcache)]
    glance.images[image.id].status = "deactivated"
    # Another caller learns it first: the cached copy goes, and so does TOKEN's "allowed".
    status, _, body = await imgcache.get(image.id, token=OTHER_TOKEN)
    assert status == 403 and len(body) < 4096
    status, headers, body = await imgcache.get(image.id, token=TOKEN)
    assert status == 403 and len(body) < 4096, (status, headers)
    assert (await imgcache.metrics())["imgcache_cache_entries"] == 0


async def test_bodiless_requests_to_glance_carry_no_framing_headers(
    glance: GlanceStandin, imgcache: Imgcache
) -> None:
    image = await glance.add_image(size=MiB)
    # A client GET with a body and framing headers: nothing of it may reach Glance on the
    # bodiless requests made for it (metadata, download check, the fill's data GET).
    async with imgcache.session.get(imgcache.data_url(image.id), data=b"0123456789abcdef",
                                    headers={"X-Auth-Token": TOKEN,
                                             "Expect": "100-continue"}) as response:
        assert response.status == 200
        assert sha512(await response.read()) == image.os_hash_value
    for logged in glance.requests:
        names = {name.lower() for name, _ in logged.header_items}
        assert not names & {"content-length", "transfer-encoding", "expect"}, logged
    # The pooled connections to Glance are still in step: later requests all succeed.
    for _ in range(3):
        async with imgcache.session.get(f"{imgcache.url}/v2/images",
                                        headers={"X-Auth-Token": TOKEN}) as response:
            assert response.status == 200


async def test_repeated_request_headers_reach_glance_all_of_them(
    glance: GlanceStandin, imgcache: Imgcache
) -> None:
    image = await glance.add_image(size=MiB)
    async with imgcache.session.get(
            imgcache.data_url(image.id),
            headers=[("X-Auth-Token", TOKEN), ("X-Trace", "a"), ("X-Trace", "b")]) as resp:
        assert resp.status == 200
        await resp.read()
    data_gets = [r for r in glance.requests if r.path.endswith("/file")]
    assert len(data_gets) == 2  # the download check and the fill
    for logged in data_gets:
        assert [v for k, v in logged.header_items if k.lower() == "x-trace"] == ["a", "b"]


def test_connection_named_headers_are_dropped_whatever_their_case() -> None:
    plain = {"connection": "X-Hop, keep-alive", "x-hop": "1", "X-End": "2"}
    assert dict(end_to_end_headers(plain)) == {"X-End": "2"}
    assert "Content-Length" not in upstream_headers(
        {"Content-Length": "5", "X-Auth-Token": "t"}, with_body=False)
    assert upstream_headers({"Content-Length": "5"}, with_body=True)["Content-Length"] == "5"
    assert "Expect" not in upstream_headers({"Expect": "100-continue"}, with_body=True)


async def test_if_range_sends_the_whole_image(glance: GlanceStandin,
                                              imgcache: Imgcache) -> None:
    image = await glance.add_image(size=2 * MiB)
    assert (await imgcache.get(image.id))[0] == 200
    await imgcache.wait_for_metric('imgcache_fills_total{outcome="committed"}', 1)
    status, headers, body = await imgcache.get(
        image.id, headers={"Range": "bytes=0-99", "If-Range": '"some-etag"'})
    assert (status, headers["X-Cache-Status"]) == (200, "HIT")
    assert sha512(body) == image.os_hash_value
    status, _, body = await imgcache.get(image.id, headers={"Range": "bytes=0-99"})
    assert status == 206 and len(body) == 100
