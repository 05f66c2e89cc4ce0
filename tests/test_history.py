"""The access history, recorded by a real imgcache app in the test's loop (blockbuster
watching) in front of the Glance stand-in: what is recorded and what never is, the bound,
restarts, and files a crash or a stranger left behind."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

from inloop import OTHER_TOKEN, TOKEN, Imgcache, ImgcacheFactory

from imgcache.history_files import CURRENT, HEADER, PREVIOUS, RECORD, RESULT_CODES, STATE
from imgcache.standin import GlanceStandin

MiB = 1 << 20


def records(directory: Path) -> list[tuple[str, int, int, str]]:
    """(image id, size, time, result) of every record, oldest first."""
    found = []
    for name in (PREVIOUS, CURRENT):
        path = directory / name
        if path.exists():
            data = path.read_bytes()[HEADER.size:]
            found += [(str(uuid.UUID(bytes=raw)), size, when, RESULT_CODES[code])
                      for size, raw, when, code in RECORD.iter_unpack(data)]
    return found


async def read_records(directory: Path) -> list[tuple[str, int, int, str]]:
    return await asyncio.to_thread(records, directory)


async def flushed(imgcache: Imgcache, requests: int) -> None:
    """Wait until ``requests`` requests have ended (a record is made after the client got
    its last byte), then have the history write them."""
    async with asyncio.timeout(10):
        while True:
            samples = await imgcache.metrics()
            if sum(samples[f'imgcache_requests_total{{result="{r}"}}'] for r in (
                    "hit", "miss", "coalesced", "bypass", "denied", "error")) >= requests:
                break
            await asyncio.sleep(0.01)
    await imgcache.services.history.flush()


async def test_every_cache_path_request_is_recorded_and_no_token(
        glance: GlanceStandin, imgcache_factory: ImgcacheFactory) -> None:
    imgcache: Imgcache = await imgcache_factory(max_size="3M")
    small, other, big = (await glance.add_image(size=MiB), await glance.add_image(size=MiB),
                         await glance.add_image(size=4 * MiB))
    private = await glance.add_image(size=MiB, owner_tokens=[OTHER_TOKEN])
    for image, committed in ((small, 1), (small, 1), (other, 2), (big, 2)):
        status, _, _ = await imgcache.get(image.id)
        assert status == 200
        await imgcache.wait_for_metric('imgcache_fills_total{outcome="committed"}', committed)
    assert (await imgcache.get(private.id))[0] == 404  # denied: not recorded
    assert (await imgcache.get("not-a-uuid"))[0] == 400  # never reached the cache
    assert (await imgcache.get(small.id.upper()))[0] == 200  # same image, other spelling
    await flushed(imgcache, 7)
    history = imgcache.cache_dir / "history"
    got = await read_records(history)
    assert [(i, s, r) for i, s, _, r in got] == [
        (small.id, MiB, "miss"), (small.id, MiB, "hit"), (other.id, MiB, "miss"),
        (big.id, 4 * MiB, "bypass"), (small.id, MiB, "hit")]
    raw = b"".join([await asyncio.to_thread((history / CURRENT).read_bytes)])
    assert TOKEN.encode() not in raw and OTHER_TOKEN.encode() not in raw
    state = json.loads(await asyncio.to_thread((history / STATE).read_text))
    assert state == {"max_bytes": 3 * MiB, "pinned": {}}
    metrics = await imgcache.metrics()
    assert metrics['imgcache_working_set_bytes{window="1d"}'] == 6 * MiB
    assert metrics['imgcache_working_set_bytes{window="7d"}'] == 6 * MiB


async def test_history_is_bounded_and_survives_a_restart(
        glance: GlanceStandin, imgcache_factory: ImgcacheFactory) -> None:
    image = await glance.add_image(size=64 * 1024)
    first: Imgcache = await imgcache_factory(history_max_requests="10")
    for _ in range(8):
        await first.get(image.id)
    await flushed(first, 8)
    history = first.cache_dir / "history"
    assert len(await read_records(history)) == 8  # 5 in previous.bin, 3 in current.bin
    for _ in range(9):
        await first.get(image.id)
    await flushed(first, 17)
    kept = await read_records(history)
    assert 5 <= len(kept) <= 10  # never more than the bound, never less than half of it
    second: Imgcache = await imgcache_factory(history_max_requests="10")
    # Before any request of its own, the restarted server knows the week's working set.
    await second.wait_for_metric('imgcache_working_set_bytes{window="7d"}', 64 * 1024)
    await second.get(image.id)
    await flushed(second, 1)
    again = await read_records(history)
    assert again[:-1] == kept[-len(again) + 1:] and again[-1][3] == "hit"


async def test_bad_or_truncated_history_files_never_stop_the_server(
        glance: GlanceStandin, imgcache_factory: ImgcacheFactory, tmp_path: Path) -> None:
    image = await glance.add_image(size=64 * 1024)
    first: Imgcache = await imgcache_factory()
    await first.get(image.id)
    await first.wait_for_metric('imgcache_fills_total{outcome="committed"}', 1)
    for _ in range(2):
        await first.get(image.id)
    await flushed(first, 3)
    history = first.cache_dir / "history"

    def damage() -> None:
        with (history / CURRENT).open("ab") as handle:
            handle.write(b"\x01" * 7)  # a record cut short by a crash
        (history / PREVIOUS).write_bytes(b"this is not a history file at all, just noise")
        (history / STATE).write_text("{not json")

    await asyncio.to_thread(damage)
    second: Imgcache = await imgcache_factory()
    assert (await second.get(image.id))[0] == 200
    await flushed(second, 1)
    got = await read_records(history)
    assert [r for _, _, _, r in got] == ["miss", "hit", "hit", "hit"]
    assert await asyncio.to_thread((history / "previous.bad").exists)
    # A current file that is garbage from its first byte is set aside too.
    await asyncio.to_thread((history / CURRENT).write_bytes, b"\x00" * 100)
    third: Imgcache = await imgcache_factory()
    assert (await third.get(image.id))[0] == 200
    await flushed(third, 1)
    assert [r for _, _, _, r in await read_records(history)] == ["hit"]


async def test_history_off_records_nothing(glance: GlanceStandin,
                                           imgcache_factory: ImgcacheFactory) -> None:
    image = await glance.add_image(size=64 * 1024)
    imgcache: Imgcache = await imgcache_factory(history_max_requests="0")
    assert (await imgcache.get(image.id))[0] == 200
    await flushed(imgcache, 1)
    assert not await asyncio.to_thread((imgcache.cache_dir / "history").exists)
