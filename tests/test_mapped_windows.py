"""Shared read-only windows of fill files: mapped only over finished bytes, shared by their
readers, bounded, unmapped by the last holder, and never a way to kill the process."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiohttp
import pytest
from inloop import TOKEN, Imgcache
from rawhttp import RESET, raw_get

from imgcache.app import FILE_THREADS
from imgcache.fill import HOLD_BACK_BYTES
from imgcache.mapped_windows import (
    MAP_FAILED,
    MAPPED,
    MAX_MAPPED_BYTES,
    NO_ROOM,
    UNFINISHED,
    WINDOW_BYTES,
    MappedWindows,
    Window,
)
from imgcache.responses import _write_until_blocked
from imgcache.standin import Fault, GlanceStandin

MiB = 1 << 20
WINDOW = MiB
SIZE = 3 * WINDOW + 12345  # the last window is short


@pytest.fixture
def image(tmp_path: Path) -> Iterator[tuple[Path, int, bytes]]:
    """A file of SIZE random bytes, open read-only: path, fd, content."""
    path = tmp_path / "partial"
    content = os.urandom(SIZE)
    path.write_bytes(content)
    fd = os.open(path, os.O_RDONLY)
    yield path, fd, content
    os.close(fd)


def mapped_paths() -> set[str]:
    """The files this process maps now."""
    with open("/proc/self/maps") as maps:
        return {line.split(maxsplit=5)[5].strip() for line in maps
                if len(line.split(maxsplit=5)) == 6}


def sent_through_a_socket(window: Window, start: int, end: int) -> bytes:
    """Bytes ``start``..``end`` of the file as the kernel copies them from ``window``."""
    near, far = socket.socketpair()
    with near, far, ThreadPoolExecutor(1) as reader:
        received = reader.submit(lambda: b"".join(iter(lambda: far.recv(1 << 20), b"")))
        near.sendall(window.view[start - window.start:end - window.start])
        near.shutdown(socket.SHUT_WR)
        return received.result(timeout=30)


def held(windows: MappedWindows, key: str, fd: int, position: int, written: int) -> Window:
    """The window ``hold`` gives for ``position`` of a file of SIZE bytes (it must give one)."""
    window, how = windows.hold(key, fd, position, written, SIZE)
    assert (how, window is not None) == (MAPPED, True)
    assert window is not None
    return window


def test_a_window_is_mapped_only_once_the_writer_finished_it(
        image: tuple[Path, int, bytes]) -> None:
    _, fd, content = image
    windows = MappedWindows(WINDOW, 8 * WINDOW)
    assert windows.hold("fill", fd, WINDOW + 5, 2 * WINDOW - 1, SIZE) == (None, UNFINISHED)
    window = held(windows, "fill", fd, WINDOW + 5, 2 * WINDOW)
    assert (window.start, window.end) == (WINDOW, 2 * WINDOW)
    assert sent_through_a_socket(window, WINDOW + 5, 2 * WINDOW) == content[WINDOW + 5:2 * WINDOW]
    # The last window ends with the file, and is mapped only once the file is whole.
    assert windows.hold("fill", fd, SIZE - 1, SIZE - 1, SIZE) == (None, UNFINISHED)
    last = held(windows, "fill", fd, SIZE - 1, SIZE)
    assert (last.start, last.end) == (3 * WINDOW, SIZE)
    assert sent_through_a_socket(last, 3 * WINDOW, SIZE) == content[3 * WINDOW:]
    assert windows.hold("fill", fd, SIZE, SIZE, SIZE) == (None, UNFINISHED)  # past the end
    windows.drop(window)
    windows.drop(last)
    assert windows.mapped_bytes == 0


def test_readers_share_a_window_and_the_last_one_unmaps_it(
        image: tuple[Path, int, bytes]) -> None:
    path, fd, _ = image
    windows = MappedWindows(WINDOW, 8 * WINDOW)
    first = held(windows, "fill", fd, 10, SIZE)
    second = held(windows, "fill", fd, WINDOW - 1, SIZE)
    assert first is second
    assert windows.mapped_bytes == WINDOW
    assert str(path) in mapped_paths()
    windows.drop(first)
    assert windows.mapped_bytes == WINDOW and str(path) in mapped_paths()
    windows.drop(second)
    assert windows.mapped_bytes == 0
    assert str(path) not in mapped_paths()
    # Another file's window of the same index is another window.
    mine, theirs = held(windows, "fill", fd, 0, SIZE), held(windows, "other", fd, 0, SIZE)
    assert mine is not theirs
    windows.drop(mine)
    windows.drop(theirs)
    assert windows.mapped_bytes == 0 and str(path) not in mapped_paths()


def test_no_more_than_the_bound_is_mapped(image: tuple[Path, int, bytes]) -> None:
    _, fd, _ = image
    windows = MappedWindows(WINDOW, 2 * WINDOW)
    first = held(windows, "fill", fd, 0, SIZE)
    second = held(windows, "fill", fd, WINDOW, SIZE)
    assert windows.hold("fill", fd, 2 * WINDOW, SIZE, SIZE) == (None, NO_ROOM)
    # A window already mapped is still shared at the bound.
    again = held(windows, "fill", fd, 0, SIZE)
    assert again is first
    windows.drop(again)
    windows.drop(first)
    third = held(windows, "fill", fd, 2 * WINDOW, SIZE)
    assert windows.mapped_bytes == 2 * WINDOW
    windows.drop(second)
    windows.drop(third)
    assert windows.mapped_bytes == 0


def test_every_sending_thread_finds_room_for_its_window() -> None:
    """A sending step holds at most one window: with one window per thread under the
    bound, a reader never falls back to sendfile for want of room (NO_ROOM is a guard)."""
    assert FILE_THREADS * WINDOW_BYTES <= MAX_MAPPED_BYTES


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="multiple"):
        MappedWindows(WINDOW + 1, 8 * WINDOW)
    with pytest.raises(ValueError, match="no room"):
        MappedWindows(WINDOW, WINDOW - 1)


def test_a_file_shorter_than_its_window_is_not_mapped(image: tuple[Path, int, bytes]) -> None:
    path, fd, _ = image
    os.truncate(path, WINDOW)
    windows = MappedWindows(WINDOW, 8 * WINDOW)
    assert windows.hold("fill", fd, WINDOW, SIZE, SIZE) == (None, MAP_FAILED)
    assert windows.mapped_bytes == 0


def test_a_window_truncated_under_its_sender_fails_the_write_not_the_process(
        image: tuple[Path, int, bytes]) -> None:
    path, fd, _ = image
    windows = MappedWindows(WINDOW, 8 * WINDOW)
    window = held(windows, "fill", fd, WINDOW, SIZE)
    os.truncate(path, 0)
    near, far = socket.socketpair()
    with near, far:
        with pytest.raises(OSError) as raised:
            os.write(near.fileno(), window.view[:WINDOW // 2])
        assert raised.value.errno == errno.EFAULT  # a read from Python would be SIGBUS
        with pytest.raises(OSError) as raised:
            _write_until_blocked(near.fileno(), window, WINDOW, 2 * WINDOW)
        assert raised.value.errno == errno.EIO
        assert "cannot be read" in str(raised.value)
    windows.drop(window)
    assert windows.mapped_bytes == 0 and str(path) not in mapped_paths()


# -- end to end: the readers of a fill, through a real imgcache app ------------------------


async def test_readers_behind_a_fill_in_flight_are_sent_from_windows_never_its_tail(
    glance: GlanceStandin, imgcache: Imgcache
) -> None:
    # Three whole windows and a short one; the held-back tail spans the last two. Glance
    # sends all but the last byte, pauses 2 s with the third window written, then sends
    # the last byte; a byte near the end is wrong, so the fill fails verification.
    size = 3 * WINDOW_BYTES + 100
    image = await glance.add_image(size=size)
    assert image.path is not None
    glance.faults[image.id] = Fault(rate=8 * MiB, stall_at=size - 1, stall_seconds=2,
                                    corrupt_at=size - 50)
    path = f"/v2/images/{image.id}/file"
    headers = {"X-Auth-Token": TOKEN}
    first = asyncio.create_task(raw_get(imgcache.url, path, headers))
    await asyncio.sleep(0.8)  # about two windows written: the next readers start behind
    late = [asyncio.create_task(raw_get(imgcache.url, path, headers)) for _ in range(2)]
    ranged = asyncio.create_task(raw_get(imgcache.url, path, {
        **headers, "Range": f"bytes={WINDOW_BYTES - 5}-{2 * WINDOW_BYTES + 5}"}))
    answers = await asyncio.gather(first, *late)
    content = await asyncio.to_thread(image.path.read_bytes)
    for answer in answers:
        assert answer.ending == RESET
        assert len(answer.body) <= size - HOLD_BACK_BYTES
        assert answer.body == content[:len(answer.body)]
    # A range is held back and reset the same way; what it got is right.
    partial = await ranged
    assert (partial.status, partial.ending) == (206, RESET)
    assert len(partial.body) <= WINDOW_BYTES + 11 - HOLD_BACK_BYTES
    assert partial.body == content[WINDOW_BYTES - 5:WINDOW_BYTES - 5 + len(partial.body)]
    metrics = await imgcache.metrics()
    assert metrics['imgcache_fill_reader_bytes_total{how="mapped"}'] > 0
    assert metrics['imgcache_fill_reader_bytes_total{how="unfinished"}'] > 0
    await assert_nothing_mapped(imgcache)


async def assert_nothing_mapped(imgcache: Imgcache) -> None:
    """No image file of ``imgcache`` (committed or partial) is mapped any more."""
    assert imgcache.services.sender.mapped_bytes == 0
    store = imgcache.services.store
    image_dirs = (f"{store.data_dir}/", f"{store.partial_dir}/")
    assert not [p for p in await asyncio.to_thread(mapped_paths) if p.startswith(image_dirs)]


async def test_a_file_truncated_under_its_readers_resets_them_and_the_next_client_is_served(
    glance: GlanceStandin, imgcache: Imgcache
) -> None:
    image = await glance.add_image(size=96 * MiB)  # more than the sockets' buffers take
    async with imgcache.session.get(imgcache.data_url(image.id),
                                    headers={"X-Auth-Token": TOKEN}) as resp:
        assert resp.headers["X-Cache-Status"] == "MISS"
        body = await resp.content.readexactly(64 << 10)  # then the socket fills up
        await imgcache.wait_for_metric('imgcache_fills_total{outcome="committed"}', 1)
        [name] = await imgcache.data_files()
        await asyncio.to_thread(os.truncate, imgcache.cache_dir / "data" / name, 0)
        with pytest.raises(aiohttp.ClientPayloadError):
            body += await resp.read()
    await imgcache.wait_for_metric('imgcache_requests_total{result="error"}', 1)
    await assert_nothing_mapped(imgcache)
    status, headers, fresh = await imgcache.get(image.id)
    assert (status, headers["X-Cache-Status"]) == (200, "MISS")
    assert hashlib.sha512(fresh).hexdigest() == image.os_hash_value
