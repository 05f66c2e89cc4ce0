"""End-to-end tests against a REAL glance-api 33 installed from PyPI (tests/glance/).

Set up once with tests/glance/setup-venv.sh. A missing Glance venv fails these tests, it never
skips them. Downloads go through python-glanceclient (tests/glance/download.py), run with the
Glance venv's python, exactly as Nova would fetch an image.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import urllib.request
from collections.abc import Iterator

import pytest
from netlink.link import Network
from processes import ImgcacheProcess
from realglance import RealGlance

pytestmark = pytest.mark.realglance

DOWNLOAD_PY = pathlib.Path(__file__).parent / "glance" / "download.py"
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def glance(tmp_path_factory: pytest.TempPathFactory, network: Network) -> Iterator[RealGlance]:
    # At the far end of the test network: imgcache and the clients reach it over the link.
    try:
        server = RealGlance(tmp_path_factory.mktemp("glance"), host=network.far_host,
                            command_prefix=network.command_prefix())
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


@pytest.fixture
def imgcache(glance: RealGlance, tmp_path: pathlib.Path) -> Iterator[ImgcacheProcess]:
    server = ImgcacheProcess(glance.url, tmp_path / "cache", max_size="1G")
    yield server
    server.stop()


def test_download_through_imgcache(
    glance: RealGlance, imgcache: ImgcacheProcess, tmp_path: pathlib.Path
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
