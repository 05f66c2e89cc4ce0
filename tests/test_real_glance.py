"""End-to-end tests against a REAL glance-api 33 installed from PyPI (tests/glance/).

Set up once with tests/glance/setup-venv.sh. A missing Glance venv fails these tests, it never
skips them. Downloads go through python-glanceclient (tests/glance/download.py), run with the
Glance venv's python, exactly as Nova would fetch an image.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType

import pytest

pytestmark = pytest.mark.realglance

GLANCE_DIR = pathlib.Path(__file__).parent / "glance"
DOWNLOAD_PY = GLANCE_DIR / "download.py"


def _load_harness() -> ModuleType:
    """Import tests/glance/harness.py by path: tests/ is not a package."""
    spec = importlib.util.spec_from_file_location(
        "imgcache_glance_harness", GLANCE_DIR / "harness.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


harness = _load_harness()
RealGlance = harness.RealGlance
free_port, stop_process, tail = harness.free_port, harness.stop_process, harness.tail
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def glance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealGlance]:
    try:
        server = RealGlance(tmp_path_factory.mktemp("glance"))
        server.start()
    except RuntimeError as exc:  # no venv, or Glance would not start: fail, never skip
        raise pytest.fail.Exception(str(exc), pytrace=False) from None
    try:
        yield server
    finally:
        server.stop()


def random_file(path: pathlib.Path, size: int) -> pathlib.Path:
    """Write size random bytes to path."""
    with path.open("wb") as fh:
        for _ in range(size // MiB):
            fh.write(os.urandom(MiB))
        fh.write(os.urandom(size % MiB))
    return path


def download(glance: RealGlance, endpoint: str, image_id: str, out: pathlib.Path) -> dict:
    """Download with python-glanceclient; fail the test with its message if it raised."""
    proc = subprocess.run(
        [glance.venv_python, DOWNLOAD_PY, endpoint, image_id, out],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, f"download.py via {endpoint} failed:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_direct_download_from_glance(glance: RealGlance, tmp_path: pathlib.Path) -> None:
    src = random_file(tmp_path / "image.raw", 8 * MiB)
    meta = glance.create_image(src, name="direct")
    assert meta["status"] == "active"
    assert meta["size"] == 8 * MiB

    out = tmp_path / "out.raw"
    summary = download(glance, glance.url, meta["id"], out)

    assert summary["bytes"] == 8 * MiB
    assert out.read_bytes() == src.read_bytes()


@dataclass
class Imgcache:
    url: str
    metrics_url: str
    log: pathlib.Path


def _tcp_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@pytest.fixture
def imgcache(glance: RealGlance, tmp_path: pathlib.Path) -> Iterator[Imgcache]:
    script = pathlib.Path(sys.executable).with_name("imgcache")
    if not script.exists():
        pytest.fail(f"the imgcache console script is missing at {script}", pytrace=False)
    port, metrics_port = free_port(), free_port()
    log = tmp_path / "imgcache.log"
    # fmt: off
    cmd = [
        script, "serve",
        "--listen", f"127.0.0.1:{port}",
        "--upstream", glance.url,
        "--cache-dir", tmp_path / "cache",
        "--max-size", "1G",
        "--metrics-listen", f"127.0.0.1:{metrics_port}",
    ]
    # fmt: on
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        server = Imgcache(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}", log)
        deadline = time.monotonic() + 30
        while not (_tcp_open(port) and _healthy(f"{server.metrics_url}/healthz")):
            if proc.poll() is not None:
                pytest.fail(
                    f"imgcache exited with {proc.returncode} while starting:\n{tail(log)}",
                    pytrace=False,
                )
            if time.monotonic() > deadline:
                pytest.fail(f"imgcache did not become healthy in 30 s:\n{tail(log)}", pytrace=False)
            time.sleep(0.1)
        yield server
    finally:
        stop_process(proc)


def test_download_through_imgcache(
    glance: RealGlance, imgcache: Imgcache, tmp_path: pathlib.Path
) -> None:
    src = random_file(tmp_path / "image.raw", 24 * MiB)
    image_id = glance.create_image(src, name="through-imgcache")["id"]
    expected = src.read_bytes()

    first = tmp_path / "first.raw"
    download(glance, imgcache.url, image_id, first)
    assert first.read_bytes() == expected

    second = tmp_path / "second.raw"
    download(glance, imgcache.url, image_id, second)
    assert second.read_bytes() == expected

    with urllib.request.urlopen(f"{imgcache.url}/v2/images/{image_id}/file", timeout=60) as resp:
        assert resp.status == 200
        assert resp.headers["X-Cache-Status"] == "HIT"
        assert resp.read() == expected

    assert glance.data_gets(image_id) == 1, "\n".join(glance.access_lines())

    with urllib.request.urlopen(f"{imgcache.metrics_url}/metrics", timeout=10) as resp:
        metrics = resp.read().decode()
    assert 'imgcache_fills_total{outcome="committed"} 1.0' in metrics, metrics
