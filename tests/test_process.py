"""imgcache as a real process: zero-copy hits, bounded memory, start-up errors."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from processes import IMGCACHE, ImgcacheProcess, StandinProcess

from imgcache.app import CONTROL_THREADS, FILE_THREADS
from imgcache.threadnames import FILES, HASHING, INDEX, LOGGING, SENDING, WRITING

MiB = 1 << 20
TOKEN = "token-a"


@pytest.fixture
def standin(tmp_path: Path) -> Iterator[StandinProcess]:
    process = StandinProcess(tmp_path / "glance", "64M")
    yield process
    process.stop()


@pytest.fixture
def server(tmp_path: Path, standin: StandinProcess) -> Iterator[ImgcacheProcess]:
    process = ImgcacheProcess(standin.url, tmp_path / "cache")
    yield process
    process.stop()


def curl(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["curl", "-sS", "-H", f"X-Auth-Token: {TOKEN}", *args, url],
                          capture_output=True, text=True, timeout=120, check=False)


def wait_until_traced(pid: int, timeout: float = 10) -> None:
    """Wait until strace has attached to every thread of ``pid``."""
    deadline = time.monotonic() + timeout
    while True:
        tracers = [
            line.split()[1]
            for task in Path(f"/proc/{pid}/task").iterdir()
            for line in (task / "status").read_text().splitlines()
            if line.startswith("TracerPid:")
        ]
        if tracers and all(t != "0" for t in tracers):
            return
        assert time.monotonic() < deadline, "strace did not attach"
        time.sleep(0.05)


def test_hits_are_sent_with_sendfile_under_uvloop(
    standin: StandinProcess, server: ImgcacheProcess, tmp_path: Path
) -> None:
    """The hit path's bytes leave through sendfile(2), not read()+write() copies, as strace
    sees the running server's syscalls."""
    if shutil.which("strace") is None:
        pytest.fail("strace is needed for this test (apt-get install strace)")
    url = f"{server.url}/v2/images/{standin.image_id}/file"
    assert curl(url, "-o", "/dev/null").returncode == 0
    server.wait_for_metric('imgcache_fills_total{outcome="committed"}', 1)
    trace = tmp_path / "strace.out"
    tracer = subprocess.Popen(
        ["strace", "-f", "-qq", "-e", "trace=sendfile,write,writev,sendto,sendmsg",
         "-o", str(trace), "-p", str(server.pid)], stderr=subprocess.PIPE)
    wait_until_traced(server.pid)
    done = curl(url, "-o", "/dev/null", "-D", "-", "-w", "%{size_download}")
    time.sleep(0.5)
    tracer.send_signal(signal.SIGINT)  # strace detaches and flushes its output
    tracer.wait(10)
    assert "X-Cache-Status: HIT" in done.stdout
    assert done.stdout.endswith(str(standin.size))
    sent_by = {"sendfile": 0, "copy": 0}
    # With threads, strace may split a call: "sendfile(... <unfinished ...>", then
    # "<... sendfile resumed>...) = N"; the result is on the line that ends the call.
    for line in trace.read_text().splitlines():
        call = re.search(r"\b(sendfile|writev|write|sendto|sendmsg)\b", line)
        result = re.search(r"\)\s+=\s+(\d+)$", line)
        if call and result:
            kind = "sendfile" if call.group(1) == "sendfile" else "copy"
            sent_by[kind] += int(result.group(1))
    assert sent_by["sendfile"] >= standin.size
    assert sent_by["copy"] < 64 * 1024  # the status line and headers only


def test_a_streamed_upload_keeps_memory_bounded(
    standin: StandinProcess, server: ImgcacheProcess
) -> None:
    """A 1 GiB upload (chunked, as curl sends stdin) through imgcache leaves its peak RSS
    far below the upload's size."""
    created = curl(f"{server.url}/v2/images", "-X", "POST", "-H",
                   "Content-Type: application/json", "-d", '{"name": "big"}')
    image_id = re.search(r'"id": "([0-9a-f-]{36})"', created.stdout)
    assert image_id, created.stdout
    before = server.peak_rss()
    size = 1024 * MiB
    upload = subprocess.run(
        f"head -c {size} /dev/zero | curl -sS -o /dev/null -w '%{{http_code}}' -T - "
        f"-H 'X-Auth-Token: {TOKEN}' -H 'Content-Type: application/octet-stream' "
        f"{server.url}/v2/images/{image_id.group(1)}/file",
        shell=True, capture_output=True, text=True, timeout=300, check=False)
    assert upload.stdout == "204", upload.stderr
    assert server.peak_rss() - before < 64 * MiB
    assert server.peak_rss() < 200 * MiB


def test_a_large_miss_keeps_memory_bounded(
    tmp_path: Path,
) -> None:
    """Filling and serving a 1 GiB image keeps peak RSS far below the image size."""
    standin = StandinProcess(tmp_path / "glance", "1G")
    server = ImgcacheProcess(standin.url, tmp_path / "cache")
    try:
        out = subprocess.run(
            f"curl -sS -H 'X-Auth-Token: {TOKEN}' "
            f"{server.url}/v2/images/{standin.image_id}/file | sha256sum",
            shell=True, capture_output=True, text=True, timeout=300, check=True)
        assert len(out.stdout.split()[0]) == 64
        server.wait_for_metric('imgcache_fills_total{outcome="committed"}', 1, timeout=60)
        assert server.peak_rss() < 150 * MiB
    finally:
        server.stop()
        standin.stop()


@pytest.mark.parametrize(("args", "env", "config", "message"), [
    (["--max-size", "lots"], {}, None, "[cache] max_size"),
    (["--listen", "nowhere"], {}, None, "[server] listen"),
    (["--upstream", "ftp://glance"], {}, None, "[upstream] url"),
    ([], {"IMGCACHE_DECISION_TTL": "-1"}, None, "IMGCACHE_DECISION_TTL"),
    ([], {"IMGCACHE_MAX_SIZ": "1G"}, None, "IMGCACHE_MAX_SIZ"),
    ([], {}, "[cache]\nmax_sise = 1G\n", "[cache] max_sise"),
    ([], {}, "[cache]\nmax_size = 1X\n", "[cache] max_size"),
])
def test_misconfiguration_stops_start_up_naming_the_key(
    tmp_path: Path, args: list[str], env: dict[str, str], config: str | None, message: str
) -> None:
    if config is not None:
        (tmp_path / "imgcache.conf").write_text(config)
        args = [*args, "--config", str(tmp_path / "imgcache.conf")]
    done = subprocess.run([IMGCACHE, "serve", "--cache-dir", str(tmp_path), *args],
                          env={"PATH": "/usr/bin:/bin", **env}, capture_output=True,
                          text=True, timeout=30, check=False)
    assert done.returncode == 2
    assert message in done.stderr
    assert "configuration error" in done.stderr


def test_flag_beats_environment_beats_file(tmp_path: Path) -> None:
    from imgcache.config import load_settings

    config = tmp_path / "imgcache.conf"
    config.write_text("[cache]\nmax_size = 1G\ndir = /from/file\n[auth]\ndecision_ttl = 5s\n")
    settings = load_settings({"max_size": "3G"}, config,
                             {"IMGCACHE_MAX_SIZE": "2G", "IMGCACHE_DECISION_TTL": "7"})
    assert settings.max_size == 3 << 30
    assert settings.decision_ttl == 7
    assert settings.cache_dir == Path("/from/file")
    assert settings.listen == ("127.0.0.1", 9293)
    assert settings.upstream == ("http://127.0.0.1:9292",)


def test_sample_config_documents_every_option_with_its_default() -> None:
    from imgcache.config import OPTIONS, load_settings

    sample = Path(__file__).parent.parent / "config" / "imgcache.conf"
    text = sample.read_text()
    for option in OPTIONS:
        assert re.search(rf"^\[{option.section}\]", text, re.M), option.section
        assert re.search(rf"^#\s*{option.key} =\s*{re.escape(option.default)}$", text, re.M), \
            option.key
    load_settings({}, sample, {})  # and it loads


def test_hit_body_is_the_image(standin: StandinProcess, server: ImgcacheProcess) -> None:
    url = f"{server.url}/v2/images/{standin.image_id}/file"
    first = hashlib.sha256(subprocess.run(
        ["curl", "-sS", "-H", f"X-Auth-Token: {TOKEN}", url], capture_output=True,
        check=True).stdout).hexdigest()
    server.wait_for_metric('imgcache_fills_total{outcome="committed"}', 1)
    second = subprocess.run(["curl", "-sS", "-H", f"X-Auth-Token: {TOKEN}", url],
                            capture_output=True, check=True).stdout
    assert hashlib.sha256(second).hexdigest() == first
    assert len(second) == standin.size


def test_demo_runs_a_storm_with_one_glance_download() -> None:
    done = subprocess.run([IMGCACHE, "demo", "--clients", "6", "--image-size", "4M"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "Glance served 1 image download(s) for 12 client downloads" in done.stdout
    assert "6 verified against Glance's sha512, X-Cache-Status: COALESCED x5, MISS x1" \
        in done.stdout
    assert "X-Cache-Status: HIT x6" in done.stdout
    assert ("hit ratio 50% (6 of 12 downloads served from the cache, 5 more joined a "
            "download in flight); Glance sent 4.0 MiB for 48.0 MiB served: 44.0 MiB it did "
            "not have to send") in done.stdout


def test_json_logs_have_one_object_per_image_request_and_no_token(
    standin: StandinProcess, tmp_path: Path
) -> None:
    server = ImgcacheProcess(standin.url, tmp_path / "json-cache",
                             extra=("--log-format", "json"))
    try:
        url = f"{server.url}/v2/images/{standin.image_id}/file"
        done = curl(url, "-o", "/dev/null", "-H", "X-OpenStack-Request-ID: req-json-1")
        assert done.returncode == 0
    finally:
        log = server.stop()
    records = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert records and len(records) == len(log.splitlines())  # every line is JSON
    [access] = [r for r in records if r.get("request_id") == "req-json-1"]
    assert access["image_id"] == standin.image_id
    assert access["result"] == "MISS" and access["status"] == 200
    assert access["bytes"] == standin.size and access["duration"] >= 0
    assert TOKEN not in log


def test_file_threads_run_below_the_event_loops_priority(server: ImgcacheProcess) -> None:
    """In a storm every file thread copies bytes at once; the loop, which answers every
    client, must not queue behind them for a CPU (imgcache.app.FILE_THREADS_NICE)."""
    nice: dict[str, list[int]] = {}
    for task in Path(f"/proc/{server.pid}/task").iterdir():
        fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        name = "loop" if task.name == str(server.pid) else (task / "comm").read_text().strip()
        nice.setdefault(name, []).append(int(fields[16]))
    assert nice.pop("loop") == [0]
    # Every sending thread is started before serving, each at the loop's nice + 10, and
    # shows its name to the OS; the other threads keep the loop's priority.
    assert nice.pop(SENDING) == [10] * FILE_THREADS
    assert nice and all(value == 0 for values in nice.values() for value in values)


def test_threads_show_their_roles(standin: StandinProcess, server: ImgcacheProcess) -> None:
    """Once a download went through, its writer and hasher show as such (``top -H``)."""
    done = curl(f"{server.url}/v2/images/{standin.image_id}/file", "-o", "/dev/null")
    assert done.returncode == 0
    server.wait_for_metric('imgcache_fills_total{outcome="committed"}', 1)
    names = Counter((task / "comm").read_text().strip()
                    for task in Path(f"/proc/{server.pid}/task").iterdir())
    assert names[SENDING] == FILE_THREADS
    assert names[HASHING] >= 1 and names[WRITING] >= 1
    assert names[INDEX] == 1 and names[FILES] == CONTROL_THREADS
    assert names[LOGGING] == 1
