"""Signals to a real imgcache process: SIGTERM drains, SIGHUP reloads; and start-up with a
large cache."""

from __future__ import annotations

import hashlib
import json
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from processes import ImgcacheProcess, StandinProcess, make_cache, wait_for_http

TOKEN = "token-a"


@pytest.fixture(scope="module")
def slow_glance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StandinProcess]:
    """Images of 16 MiB served at 8 MiB/s: a download takes about 2 s."""
    process = StandinProcess(tmp_path_factory.mktemp("glance"), "16M", images=3, rate="8M")
    yield process
    process.stop()


def start_download(server: ImgcacheProcess, image_id: str, out: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["curl", "-sS", "-f", "-o", str(out), "-w", "%{http_code}", "-H",
         f"X-Auth-Token: {TOKEN}", f"{server.url}/v2/images/{image_id}/file"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def accepts_connections(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def image_sha512(standin: StandinProcess, image_id: str) -> str:
    import urllib.request

    request = urllib.request.Request(f"{standin.url}/v2/images/{image_id}",
                                     headers={"X-Auth-Token": TOKEN})
    with urllib.request.urlopen(request) as response:
        return json.load(response)["os_hash_value"]


def test_sigterm_drains_running_downloads_then_exits_0(
    tmp_path: Path, slow_glance: StandinProcess
) -> None:
    server = ImgcacheProcess(slow_glance.url, tmp_path / "cache")
    image_id = slow_glance.image_ids[0]
    client = start_download(server, image_id, tmp_path / "image")
    time.sleep(0.5)
    server.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    while accepts_connections(server.port):
        assert time.monotonic() < deadline, "still accepting connections after SIGTERM"
        time.sleep(0.05)
    stdout, stderr = client.communicate(timeout=30)
    assert stdout == "200", stderr
    digest = hashlib.sha512((tmp_path / "image").read_bytes()).hexdigest()
    assert digest == image_sha512(slow_glance, image_id)
    assert server.proc.wait(30) == 0
    log = server.stop()
    assert "stopping: no new connections" in log
    assert list((tmp_path / "cache" / "partial").iterdir()) == []


def test_sigterm_cuts_downloads_after_the_grace_period_leaving_nothing_partial(
    tmp_path: Path, slow_glance: StandinProcess
) -> None:
    server = ImgcacheProcess(slow_glance.url, tmp_path / "cache",
                             extra=("--drain-grace", "0.3s"))
    client = start_download(server, slow_glance.image_ids[1], tmp_path / "image")
    time.sleep(0.5)
    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(15) == 0
    assert time.monotonic() - started < 5
    client.communicate(timeout=10)
    assert client.returncode != 0  # cut mid-body: curl sees an incomplete transfer
    server.stop()
    assert list((tmp_path / "cache" / "partial").iterdir()) == []
    assert list((tmp_path / "cache" / "data").iterdir()) == []


def test_sighup_reloads_what_can_change_and_refuses_a_bad_config(
    tmp_path: Path, slow_glance: StandinProcess
) -> None:
    config = tmp_path / "imgcache.conf"
    config.write_text("[cache]\nmax_size = 1G\n[auth]\ndecision_ttl = 30s\n")
    server = ImgcacheProcess(slow_glance.url, tmp_path / "cache", max_size=None,
                             extra=("--config", str(config)))
    try:
        assert server.metric("imgcache_cache_max_bytes") == 1 << 30
        config.write_text("[cache]\nmax_size = 2G\n[auth]\ndecision_ttl = 5s\n"
                          "[server]\ndrain_grace = 10s\n")
        server.proc.send_signal(signal.SIGHUP)
        server.wait_for_metric("imgcache_cache_max_bytes", 2 << 30)
        config.write_text("[cache]\nmax_size = lots\n")
        server.proc.send_signal(signal.SIGHUP)
        time.sleep(1)
        assert server.metric("imgcache_cache_max_bytes") == 2 << 30
        wait_for_http(server.metrics_url + "/healthz")
    finally:
        log = server.stop()
    assert "reload: max_size 1.0 GiB -> 2.0 GiB" in log
    assert "reload: decision_ttl 30.0 -> 5.0" in log
    assert "reload: drain_grace changed but needs a restart" in log
    assert "reload refused, the running configuration is kept" in log
    assert "[cache] max_size" in log


def test_a_cache_of_10000_entries_is_loaded_and_swept_at_start(
    tmp_path: Path, slow_glance: StandinProcess
) -> None:
    """(How fast is measured by bench/scaling/startup.py, not here.)"""
    make_cache(tmp_path / "cache", 10_000)
    (tmp_path / "cache" / "partial" / "leftover.partial").write_bytes(b"half")
    server = ImgcacheProcess(slow_glance.url, tmp_path / "cache")
    try:
        assert server.metric("imgcache_cache_entries") == 10_000
        assert server.metric("imgcache_cache_bytes") == 10_000 * 4096
        assert list((tmp_path / "cache" / "partial").iterdir()) == []
    finally:
        server.stop()


def test_reconcile_drops_records_without_files_and_files_without_records(
    tmp_path: Path, slow_glance: StandinProcess
) -> None:
    make_cache(tmp_path / "cache", 5)
    files = sorted((tmp_path / "cache" / "data").iterdir())
    files[0].unlink()  # a record whose file is gone
    (tmp_path / "cache" / "data" / "stray.file").write_bytes(b"?")  # a file with no record
    server = ImgcacheProcess(slow_glance.url, tmp_path / "cache")
    try:
        assert server.metric("imgcache_cache_entries") == 4
        names = {p.name for p in (tmp_path / "cache" / "data").iterdir()}
        assert "stray.file" not in names and len(names) == 4
    finally:
        log = server.stop()
    assert "a data file with no index record" in log




def test_pins_above_a_lowered_cap_start_serve_and_report_the_overshoot(
    tmp_path: Path, slow_glance: StandinProcess
) -> None:
    """A cap lowered below the pinned bytes (in the config, then restarted; under systemd a
    refusal would be a restart loop) evicts what may go and says how far over it is."""
    make_cache(tmp_path / "cache", 10, pinned=4)  # 4 x 4 KiB pinned
    server = ImgcacheProcess(slow_glance.url, tmp_path / "cache", max_size="8K")
    try:
        assert server.metric("imgcache_cache_entries") == 4  # only the pinned ones are left
        assert server.metric("imgcache_cache_pinned_bytes") == 4 * 4096
        assert server.metric("imgcache_cache_over_cap_bytes") == 2 * 4096
        wait_for_http(server.metrics_url + "/healthz")
    finally:
        log = server.stop()
    assert "over its cap of 8.0 KiB that cannot be evicted" in log


def test_a_sighup_shrinking_the_cap_below_the_pins_evicts_what_may_go(
    tmp_path: Path, slow_glance: StandinProcess
) -> None:
    make_cache(tmp_path / "cache", 10, pinned=3)
    config = tmp_path / "imgcache.conf"
    config.write_text("[cache]\nmax_size = 1G\n")
    server = ImgcacheProcess(slow_glance.url, tmp_path / "cache", max_size=None,
                             extra=("--config", str(config)))
    try:
        assert server.metric("imgcache_cache_entries") == 10
        config.write_text("[cache]\nmax_size = 4K\n")
        server.proc.send_signal(signal.SIGHUP)
        server.wait_for_metric("imgcache_cache_max_bytes", 4096)
        assert server.metric("imgcache_cache_entries") == 3
        assert server.metric("imgcache_cache_over_cap_bytes") == 2 * 4096
    finally:
        log = server.stop()
    assert "over its cap of 4.0 KiB that cannot be evicted" in log
