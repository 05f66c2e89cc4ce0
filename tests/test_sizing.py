"""``imgcache sizing`` against a real server process: over the management socket and on
the stopped server's cache directory, its predictions against what the server measured and
against an LRU simulated request by request; the PNG, the what-if policies, the predicted
gauges, and a plain install without the sizing extra."""

from __future__ import annotations

import ctypes.util
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from processes import IMGCACHE, ImgcacheProcess, StandinProcess
from test_curve import random_trace, simulate, write_history

MiB = 1 << 20
TOKEN = "token-a"
ROOT = Path(__file__).parent.parent
#: Image indices requested, in order (images of 1 MiB; the server's cap holds 3).
SEQUENCE = [0, 1, 0, 2, 0, 1, 3, 0, 4, 5, 0, 1, 2, 0, 0, 1, 5, 4, 3, 2, 1, 0, 0, 0]


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StandinProcess]:
    process = StandinProcess(tmp_path_factory.mktemp("glance"), "1M", images=6)
    yield process
    process.stop()


def sizing(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([IMGCACHE, "sizing", *args], capture_output=True, text=True,
                          timeout=300, check=False,
                          env={"PATH": os.environ["PATH"], **(env or {})})


def replay(server: ImgcacheProcess, ids: list[str]) -> None:
    """Request SEQUENCE one by one, waiting for each fill to commit."""
    committed = 0
    for index in SEQUENCE:
        request = urllib.request.Request(f"{server.url}/v2/images/{ids[index]}/file",
                                         headers={"X-Auth-Token": TOKEN})
        with urllib.request.urlopen(request) as response:
            response.read()
            status = response.headers["X-Cache-Status"]
        if status == "MISS":
            committed += 1
            server.wait_for_metric('imgcache_fills_total{outcome="committed"}', committed)


def wait_for_counted_requests(server: ImgcacheProcess, total: int) -> dict[str, float]:
    """imgcache_requests_total by result, once its results add up to ``total``."""
    deadline = time.monotonic() + 30
    while True:
        counts = {result: server.metric(f'imgcache_requests_total{{result="{result}"}}')
                  for result in ("hit", "miss", "coalesced", "bypass", "denied", "error")}
        if sum(counts.values()) >= total or time.monotonic() > deadline:
            return counts
        time.sleep(0.05)


def test_sizing_predicts_what_the_server_measured(tmp_path: Path,
                                                  standin: StandinProcess) -> None:
    server = ImgcacheProcess(standin.url, tmp_path / "cache", max_size="3M",
                             extra=("--predict-interval", "1s"))
    try:
        replay(server, standin.image_ids)
        # A request is counted once its handler ends, which may be just after the client
        # read the last byte: wait for every one before comparing.
        counts = wait_for_counted_requests(server, len(SEQUENCE))
        hits = counts["hit"] + counts["coalesced"]
        caps = [MiB, 2 * MiB, 3 * MiB, 4 * MiB, 6 * MiB]
        done = sizing("--socket", str(server.admin_socket), "--json",
                      "--caps", ",".join(f"{c // MiB}M" for c in caps))
        assert done.returncode == 0, done.stderr
        rows = json.loads(done.stdout)
        assert [r["cap_bytes"] for r in rows] == caps
        assert rows[2]["hit_ratio"] == pytest.approx(hits / len(SEQUENCE), abs=1e-9)
        requests = [(standin.image_ids[i], MiB, "hit") for i in SEQUENCE]
        for row in rows:
            expected_hits, count, _, _ = simulate(requests, row["cap_bytes"], {})
            assert row["requests"] == count == len(SEQUENCE)
            assert row["hits"] == expected_hits
            assert row["byte_hit_ratio"] == pytest.approx(expected_hits / count)
            assert row["method"] == "exact"
            assert row["glance_bytes_saved_per_day"] >= row["hit_bytes"]
        assert rows[0]["hit_ratio"] < rows[2]["hit_ratio"] < rows[4]["hit_ratio"]
        # The gauges, recomputed every second here, come to agree with the command.
        deadline = time.monotonic() + 60
        while server.metric('imgcache_predicted_hit_ratio{cap_factor="2"}') != \
                pytest.approx(rows[4]["hit_ratio"]):
            assert time.monotonic() < deadline, "the predicted gauges never caught up"
            time.sleep(0.2)
        assert server.metric('imgcache_predicted_byte_hit_ratio{cap_factor="1"}') == \
            pytest.approx(rows[2]["byte_hit_ratio"])
        assert server.metric('imgcache_working_set_bytes{window="1d"}') == 6 * MiB
        # The human report: default caps 1/4x to 8x, a table and bars, and the PNG.
        png = tmp_path / "curve.png"
        human = sizing("--socket", str(server.admin_socket), "--png", str(png),
                       "--policies")
        assert human.returncode == 0, human.stderr
        assert "24 requests of 6 images" in human.stdout and "(exact)" in human.stdout
        for cap in ("768.0 KiB", "1.5 MiB", "3.0 MiB", "6.0 MiB", "12.0 MiB", "24.0 MiB"):
            assert cap in human.stdout
        assert "█" in human.stdout and "S3-FIFO" in human.stdout and "GDSF" in human.stdout
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
        bad = sizing("--socket", str(server.admin_socket), "--caps", "10Q")
        assert bad.returncode == 2 and "--caps" in bad.stderr
    finally:
        server.stop()
    # Stopped: the same answer from its cache directory.
    offline = sizing("--cache-dir", str(tmp_path / "cache"), "--json", "--caps",
                     ",".join(f"{c // MiB}M" for c in caps))
    assert offline.returncode == 0, offline.stderr
    assert json.loads(offline.stdout) == rows
    # No server, no --cache-dir: the config's cache directory is read, and it says so.
    fallback = sizing("--json", env={"IMGCACHE_CACHE_DIR": str(tmp_path / "cache"),
                                     "IMGCACHE_ADMIN_SOCKET": str(tmp_path / "none.sock")})
    assert fallback.returncode == 0, fallback.stderr
    assert "is not running" in fallback.stderr and "reading its history" in fallback.stderr
    assert [r["cap_factor"] for r in json.loads(fallback.stdout)] == [
        0.25, 0.5, 1, 2, 4, 8]
    nothing = sizing("--cache-dir", str(tmp_path))
    assert nothing.returncode == 1 and "no access history" in nothing.stderr


def test_a_plain_install_says_what_to_install(tmp_path: Path) -> None:
    """Without numpy (imgcache[sizing] not installed) the command says what to do."""
    history = tmp_path / "cache" / "history"
    history.mkdir(parents=True)
    without_numpy = ("import sys; sys.modules['numpy'] = None; "
                     "from imgcache.cli import main; sys.exit(main(sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", without_numpy, "sizing", "--cache-dir",
                           str(tmp_path / "cache")], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 1
    assert "pip install 'imgcache[sizing]'" in done.stderr


@pytest.mark.skipif(ctypes.util.find_library("seccomp") is None
                    or shutil.which("systemd-analyze") is None,
                    reason="needs libseccomp and systemd-analyze (Debian's systemd)")
def test_the_servers_sizing_job_works_under_the_units_seccomp_rules(tmp_path: Path) -> None:
    """MemoryDenyWriteExecute=yes leaves numba no executable memory: the job the server
    starts for the gauges then runs the same pass uncompiled, with the same answer."""
    write_history(tmp_path / "history", random_trace(3, images=40, count=1500))
    request = json.dumps({"history_dir": str(tmp_path / "history"), "max_bytes": 60 * MiB,
                          "pinned": {}})
    job = [sys.executable, "-m", "imgcache.sizing"]
    answers = [json.loads(subprocess.run(
        [*wrapper, *job], input=request, capture_output=True, text=True, timeout=120,
        check=True).stdout) for wrapper in (
            (), (sys.executable, str(ROOT / "tests" / "sandbox.py"),
                 str(ROOT / "systemd" / "imgcache.service"), "--"))]
    assert [a.pop("kernel") for a in answers] == ["numba", "python"]
    assert answers[0] == answers[1]
