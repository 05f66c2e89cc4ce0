"""The management CLI against a real server process over its unix socket."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from processes import IMGCACHE, ImgcacheProcess, StandinProcess

TOKEN = "token-a"


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StandinProcess]:
    process = StandinProcess(tmp_path_factory.mktemp("glance"), "8M", images=4)
    yield process
    process.stop()


@pytest.fixture
def server(tmp_path: Path, standin: StandinProcess) -> Iterator[ImgcacheProcess]:
    process = ImgcacheProcess(standin.url, tmp_path / "cache", max_size="20M")
    yield process
    process.stop()


def ctl(server: ImgcacheProcess, *args: str, env: dict[str, str] | None = None,
        user: str | None = None) -> subprocess.CompletedProcess[str]:
    command = [IMGCACHE, *args, "--socket", str(server.admin_socket)]
    if user:
        command = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups",
                   *command]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False,
                          env={"PATH": os.environ["PATH"], **(env or {})})


def ctl_json(server: ImgcacheProcess, *args: str) -> dict:
    done = ctl(server, *args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_prefetch_list_stats_and_evict(server: ImgcacheProcess,
                                       standin: StandinProcess) -> None:
    first, second = standin.image_ids[:2]
    assert ctl_json(server, "list")["entries"] == []
    done = ctl(server, "prefetch", first, second, "--wait", env={"OS_AUTH_TOKEN": TOKEN})
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("cached") == 2
    listed = ctl(server, "list")
    assert first in listed.stdout and "8.0 MiB" in listed.stdout
    entries = {e["image_id"]: e for e in ctl_json(server, "list")["entries"]}
    assert set(entries) == {first, second}
    assert server.metric('imgcache_prefetches_total{outcome="cached"}') == 2
    # A prefetched image is a HIT for the next client.
    hit = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-D", "-", "-H",
                          f"X-Auth-Token: {TOKEN}",
                          f"{server.url}/v2/images/{first}/file"],
                         capture_output=True, text=True, check=True)
    assert "X-Cache-Status: HIT" in hit.stdout
    stats = ctl_json(server, "stats")
    assert stats["entries"] == 2 and stats["cache_bytes"] == 16 << 20
    assert stats["requests"]["hit"] == 1
    assert "hit ratio:   100.0%" in ctl(server, "stats").stdout
    assert ctl(server, "evict", first).returncode == 0
    assert [e["image_id"] for e in ctl_json(server, "list")["entries"]] == [second]
    missing = ctl(server, "evict", first)
    assert missing.returncode == 1 and "not cached" in missing.stderr


def test_prefetch_needs_a_token_glance_accepts(server: ImgcacheProcess,
                                               standin: StandinProcess) -> None:
    no_token = ctl(server, "prefetch", standin.image_ids[0])
    assert no_token.returncode == 1 and "OS_AUTH_TOKEN" in no_token.stderr
    refused = ctl(server, "prefetch", standin.image_ids[0], "--token", "bogus", "--wait")
    assert refused.returncode == 1
    assert "Glance refused the token (401)" in refused.stdout
    assert ctl_json(server, "list")["entries"] == []


def test_pins_survive_clear_and_eviction_and_must_fit(server: ImgcacheProcess,
                                                      standin: StandinProcess) -> None:
    a, b, c, d = standin.image_ids
    done = ctl(server, "pin", a, b, "--token", TOKEN, "--wait")  # uncached: prefetched
    assert done.returncode == 0, done.stdout + done.stderr
    pinned = {e["image_id"] for e in ctl_json(server, "list")["entries"] if e["pinned"]}
    assert pinned == {a, b}
    refused = ctl(server, "pin", c, "--token", TOKEN, "--wait")
    assert refused.returncode == 1 and "would exceed the cap" in refused.stdout
    # c fills the last 4 MiB? No: 8 MiB cannot fit next to 16 MiB pinned under 20 MiB.
    fetched = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-D", "-", "-H",
                              f"X-Auth-Token: {TOKEN}", f"{server.url}/v2/images/{d}/file"],
                             capture_output=True, text=True, check=True)
    assert "X-Cache-Status: BYPASS" in fetched.stdout  # the pinned entries are never evicted
    assert server.metric("imgcache_cache_pinned_bytes") == 16 << 20
    cleared = ctl(server, "clear")
    assert "2 pinned kept" in cleared.stdout
    assert ctl(server, "unpin", a).returncode == 0
    assert "evicted 1 images" in ctl(server, "clear").stdout
    assert [e["image_id"] for e in ctl_json(server, "list")["entries"]] == [b]
    assert "0 pinned kept" in ctl(server, "clear", "--pinned").stdout


def test_verify_evicts_a_corrupted_file(server: ImgcacheProcess,
                                        standin: StandinProcess) -> None:
    image = standin.image_ids[0]
    assert ctl(server, "prefetch", image, "--token", TOKEN, "--wait").returncode == 0
    assert ctl_json(server, "verify")["results"] == {image: "ok"}
    [data_file] = (server.admin_socket.parent / "cache" / "data").iterdir()
    with data_file.open("r+b") as handle:  # bit rot
        handle.seek(12345)
        byte = handle.read(1)
        handle.seek(12345)
        handle.write(bytes([byte[0] ^ 0x01]))
    done = ctl(server, "verify", image)
    assert done.returncode == 1 and f"{image}  corrupt" in done.stdout
    assert ctl_json(server, "list")["entries"] == []
    assert server.metric("imgcache_verify_failures_total") == 1


def test_queue_shows_jobs(server: ImgcacheProcess, standin: StandinProcess) -> None:
    ctl(server, "prefetch", standin.image_ids[0], "--token", TOKEN, "--wait")
    queue = ctl(server, "queue")
    assert queue.returncode == 0
    assert standin.image_ids[0] in queue.stdout and "cached" in queue.stdout
    assert TOKEN not in queue.stdout


def test_socket_is_private_and_refuses_other_users(tmp_path: Path,
                                                   standin: StandinProcess) -> None:
    if os.getuid() != 0:
        pytest.fail("this test runs the CLI as another user: it needs root, as CI has")
    public_dir = tmp_path / "run"
    public_dir.mkdir(mode=0o755)
    tmp_path.chmod(0o755)  # so that the other user reaches the socket's mode bits
    server = ImgcacheProcess(standin.url, tmp_path / "cache",
                             admin_socket=public_dir / "imgcache.sock")
    try:
        assert stat.S_IMODE(server.admin_socket.stat().st_mode) == 0o600
        refused = ctl(server, "stats", user="65534")
        assert refused.returncode == 3, refused.stderr
        assert "not allowed" in refused.stderr
        assert ctl(server, "stats").returncode == 0  # root is let in
    finally:
        server.stop()


def test_peer_credentials_are_checked_per_connection() -> None:
    from imgcache.admin import _peer_allowed

    assert _peer_allowed(0, 0, None)
    assert _peer_allowed(os.getuid(), 1234, None)
    assert not _peer_allowed(54321, 54321, None)
    assert _peer_allowed(54321, 4242, 4242)  # member by primary group
    assert not _peer_allowed(54321, 4243, 4242)


def test_cli_says_when_the_server_is_not_running(tmp_path: Path) -> None:
    done = subprocess.run([IMGCACHE, "list", "--socket", str(tmp_path / "none.sock")],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 3
    assert "imgcache is not running" in done.stderr
