"""Progress of long CLI waits: plain lines when stderr is not a terminal, a tqdm bar when it
is (a real pseudo-terminal), and the verify API's progress the CLI polls."""

from __future__ import annotations

import asyncio
import fcntl
import os
import pty
import select
import struct
import subprocess
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from inloop import TOKEN, Imgcache
from processes import IMGCACHE, ImgcacheProcess, StandinProcess

from imgcache.progress import plain_line
from imgcache.standin import GlanceStandin

MiB = 1 << 20


@pytest.fixture(scope="module")
def slow_standin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StandinProcess]:
    """Two 8 MiB images sent at 4 MiB/s: a prefetch lasts about 2 s."""
    process = StandinProcess(tmp_path_factory.mktemp("glance"), "8M", images=2, rate="4M")
    yield process
    process.stop()


@pytest.fixture
def server(tmp_path: Path, slow_standin: StandinProcess) -> Iterator[ImgcacheProcess]:
    process = ImgcacheProcess(slow_standin.url, tmp_path / "cache", max_size="100M")
    yield process
    process.stop()


def test_plain_line_says_bytes_rate_and_time_left() -> None:
    line = plain_line("prefetch", 3 * MiB, 12 * MiB, 3.0, "0 of 2 images done")
    assert line == ("prefetch: 3.0 MiB of 12.0 MiB (25%), 1.0 MiB/s, about 9 s left; "
                    "0 of 2 images done")
    assert plain_line("verify", 0, 0, 0.0, "") == "verify: 0 B of 0 B, 0 B/s"


def test_prefetch_wait_prints_plain_progress_lines_off_a_terminal(
        server: ImgcacheProcess, slow_standin: StandinProcess) -> None:
    image = slow_standin.image_ids[0]
    done = subprocess.run([IMGCACHE, "prefetch", image, "--wait", "--token", TOKEN,
                           "--socket", str(server.admin_socket)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert lines[0].startswith("prefetch: ") and lines[0].endswith("0 of 1 images done")
    assert lines[-1].startswith("prefetch: 8.0 MiB of 8.0 MiB (100%), ")
    assert lines[-1].endswith("; 1 of 1 images done") and "MiB/s" in lines[-1]
    assert "\r" not in done.stderr  # no bar redraws in a log
    assert image in done.stdout and "cached" in done.stdout  # the result, on stdout


def run_on_a_terminal(*args: str) -> tuple[int, str]:
    """Run the CLI with stderr on a 120-column pseudo-terminal; its exit status and what it
    drew there."""
    main, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    proc = subprocess.Popen([IMGCACHE, *args], stdout=subprocess.DEVNULL, stderr=terminal,
                            stdin=subprocess.DEVNULL)
    os.close(terminal)
    drawn = b""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([main], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(main, 65536)
            except OSError:  # the terminal closed with the process
                break
            if not chunk:
                break
            drawn += chunk
        elif proc.poll() is not None:
            break
    os.close(main)
    return proc.wait(timeout=10), drawn.decode(errors="replace")


def test_pin_wait_and_verify_draw_a_bar_on_a_terminal(
        server: ImgcacheProcess, slow_standin: StandinProcess) -> None:
    image = slow_standin.image_ids[1]
    status, drawn = run_on_a_terminal("pin", image, "--wait", "--token", TOKEN,
                                      "--socket", str(server.admin_socket))
    assert status == 0, drawn
    assert "pin:" in drawn and "100%" in drawn and "8.00M/8.00M" in drawn, drawn
    assert "\r" in drawn and "1 of 1 images done" in drawn  # redrawn in place
    status, drawn = run_on_a_terminal("verify", "--socket", str(server.admin_socket))
    assert status == 0, drawn
    assert "verify:" in drawn and "100%" in drawn and "1 images checked" in drawn, drawn


async def test_verify_run_reports_progress_while_it_hashes(
        glance: GlanceStandin, imgcache: Imgcache) -> None:
    images = [await glance.add_image(size=32 * MiB) for _ in range(4)]
    for image in images:
        status, _, _ = await imgcache.get(image.id)
        assert status == 200
    await imgcache.services.fills.wait_idle()
    entries = imgcache.services.store.entries()
    run = imgcache.services.verifier.start_run(entries, ["not-cached-id"])
    assert run.total_bytes == 4 * 32 * MiB and run.state == "running"
    seen = set()
    while run.state == "running":
        seen.add(run.done_bytes)
        await asyncio.sleep(0.001)
    assert run.done_bytes == run.total_bytes
    assert len({s for s in seen if 0 < s < run.total_bytes}) >= 2, seen
    assert run.results == {"not-cached-id": "not cached", **{i.id: "ok" for i in images}}
    assert imgcache.services.verifier.run(run.run_id) is run
