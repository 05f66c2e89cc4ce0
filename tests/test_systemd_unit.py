"""systemd/imgcache.service: systemd-analyze accepts it, it says what the server needs, and
the server works under the seccomp rules it asks for (MemoryDenyWriteExecute=,
SystemCallFilter=, RestrictAddressFamilies=, applied by tests/sandbox.py)."""

from __future__ import annotations

import concurrent.futures
import ctypes.util
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from processes import IMGCACHE, ImgcacheProcess, StandinProcess
from sandbox import service_section

from imgcache.config import OPTIONS, parse_duration
from imgcache.logwriter import EXIT_FLUSH_SECONDS

UNIT = Path(__file__).parent.parent / "systemd" / "imgcache.service"
SANDBOX = Path(__file__).with_name("sandbox.py")
INSTALLED_IMGCACHE = "/opt/imgcache/bin/imgcache"
TOKEN = "token-a"


def default(name: str) -> str:
    """An option's default, as the server would parse it."""
    return next(option.default for option in OPTIONS if option.name == name)


def systemd_analyze_verify(unit_text: str, directory: Path) -> tuple[int, str]:
    """``systemd-analyze verify`` of the unit with ExecStart pointed at this venv's imgcache
    (verify rejects a missing binary); returns its exit code and everything it printed.
    verify exits 0 on unknown keys and bad values, only warning, so any output counts."""
    assert INSTALLED_IMGCACHE in unit_text
    unit = directory / "imgcache.service"
    unit.write_text(unit_text.replace(INSTALLED_IMGCACHE, IMGCACHE))
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                          text=True, timeout=60, check=False)
    return done.returncode, (done.stdout + done.stderr).strip()


needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze not installed (make system-deps installs Debian's systemd)")


@needs_systemd_analyze
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    returncode, output = systemd_analyze_verify(UNIT.read_text(), tmp_path)
    assert (returncode, output) == (0, "")


@needs_systemd_analyze
@pytest.mark.parametrize("bad_line", ["ProtectSytem=strict", "ProtectSystem=bogus",
                                      "WatchdogSec=soon"])
def test_the_verify_check_rejects_a_broken_unit(tmp_path: Path, bad_line: str) -> None:
    """The check above can fail: a typo or a bad value makes systemd-analyze complain."""
    text = UNIT.read_text().replace("[Service]\n", f"[Service]\n{bad_line}\n", 1)
    returncode, output = systemd_analyze_verify(text, tmp_path)
    assert returncode != 0 or output, "systemd-analyze accepted a broken unit"


def test_the_unit_says_what_the_server_needs() -> None:
    service = service_section(UNIT)
    assert service["Type"] == "notify" and service["NotifyAccess"] == "main"
    assert service["WatchdogSec"] == "30s"
    assert service["ExecStart"].startswith(f"{INSTALLED_IMGCACHE} serve ")
    assert service["User"] == service["Group"] == "imgcache"
    assert "DynamicUser" not in service  # the cache must keep its owner across restarts
    # The server's defaults land in the directories systemd creates for it.
    assert Path(default("admin_socket")).parent == Path("/run", service["RuntimeDirectory"])
    assert Path(default("cache_dir")) == Path("/var/cache", service["CacheDirectory"])
    assert service["Environment"] == f"IMGCACHE_CACHE_DIR={default('cache_dir')}"
    # Stopping waits out the drain, then the writing of queued log lines, before SIGKILL.
    assert service["KillSignal"] == "SIGTERM"
    assert (parse_duration(service["TimeoutStopSec"])
            > parse_duration(default("drain_grace")) + EXIT_FLUSH_SECONDS)
    assert service["Restart"] == "on-failure"
    assert int(service["LimitNOFILE"]) >= 65536
    hardening = {
        "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
        "PrivateTmp": "yes", "PrivateDevices": "yes", "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes", "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes", "ProtectClock": "yes", "ProtectHostname": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX", "RestrictNamespaces": "yes",
        "RestrictRealtime": "yes", "RestrictSUIDSGID": "yes", "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes", "SystemCallFilter": "@system-service",
        "SystemCallArchitectures": "native", "CapabilityBoundingSet": "",
        "AmbientCapabilities": "", "UMask": "0027",
    }
    assert {key: service.get(key) for key in hardening} == hardening


@pytest.fixture
def standin(tmp_path: Path) -> Iterator[StandinProcess]:
    process = StandinProcess(tmp_path / "glance", "8M", images=2)
    yield process
    process.stop()


def download(url: str, headers: dict[str, str] | None = None) -> tuple[str, str, bytes]:
    request = urllib.request.Request(url, headers={"X-Auth-Token": TOKEN, **(headers or {})})
    with urllib.request.urlopen(request, timeout=60) as response:
        body = response.read()
        return (response.headers["X-Cache-Status"], hashlib.sha256(body).hexdigest(), body)


@pytest.mark.skipif(ctypes.util.find_library("seccomp") is None
                    or shutil.which("systemd-analyze") is None,
                    reason="needs libseccomp and systemd-analyze (Debian's systemd)")
def test_the_server_works_under_the_units_seccomp_rules(
    tmp_path: Path, standin: StandinProcess
) -> None:
    """Misses, coalesced readers, zero-copy hits, ranges, the management socket, SIGHUP and
    SIGTERM all work with no writable-executable memory, only @system-service syscalls and
    only AF_INET/AF_INET6/AF_UNIX sockets, as systemd would run the unit."""
    server = ImgcacheProcess(standin.url, tmp_path / "cache", max_size="1G",
                             wrapper=(sys.executable, str(SANDBOX), str(UNIT), "--"))
    try:
        status = Path(f"/proc/{server.pid}/status").read_text()
        assert "Seccomp:\t2" in status and "Seccomp_filters:\t3" in status, status
        url = f"{server.url}/v2/images/{standin.image_id}/file"
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            first = list(pool.map(lambda _: download(url), range(4)))
        assert sorted(result for result, _, _ in first) == ["COALESCED"] * 3 + ["MISS"]
        digests = {digest for _, digest, _ in first}
        assert len(digests) == 1
        server.wait_for_metric('imgcache_fills_total{outcome="committed"}', 1)
        result, digest, _ = download(url)
        assert (result, {digest}) == ("HIT", digests)
        result, _, part = download(url, {"Range": "bytes=100-199"})
        assert (result, part) == ("HIT", first[0][2][100:200])
        ctl = [IMGCACHE, "--socket", str(server.admin_socket), "--json"]
        for command in (["pin", standin.image_ids[1], "--wait"], ["verify"], ["stats"]):
            done = subprocess.run([ctl[0], *command, *ctl[1:]], capture_output=True,
                                  text=True, timeout=120, check=False,
                                  env={**os.environ, "OS_AUTH_TOKEN": TOKEN})
            assert done.returncode == 0, (command, done.stdout, done.stderr)
            json.loads(done.stdout)
        server.wait_for_metric('imgcache_fills_total{outcome="committed"}', 2)
        assert server.metric("imgcache_verify_failures_total") == 0
        server.proc.send_signal(signal.SIGHUP)
        server.wait_for_metric("imgcache_cache_entries", 2)
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(60) == 0
    finally:
        stderr = server.stop()
    assert "Traceback" not in stderr and "Operation not permitted" not in stderr, stderr
    assert "reload" in stderr, stderr
