"""[upstream] proxy: image-data downloads (fills, bypassed downloads) go through an HTTP
forward proxy, as they would through a P2P engine such as Dragonfly's dfdaemon; metadata and
authorization GETs still go straight to Glance. Proven with a real tinyproxy's own log
(Debian's tinyproxy-bin, installed by `make system-deps`)."""

from __future__ import annotations

import asyncio
import hashlib
import re
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from inloop import TOKEN, Imgcache, ImgcacheFactory
from pki import Pki, make_pki
from processes import free_port, stop_process

from imgcache.standin import GlanceStandin

MiB = 1 << 20
_REQUEST = re.compile(r"Request \(file descriptor \d+\): (\S+) (\S+) HTTP/")


@dataclass
class Tinyproxy:
    """A tinyproxy process on loopback and the file it logs every request to."""

    url: str
    log: Path
    proc: subprocess.Popen[bytes]

    async def requests(self) -> list[tuple[str, str]]:
        """(method, target) of every request the proxy has logged so far."""
        text = await asyncio.to_thread(self.log.read_text, errors="replace")
        return _REQUEST.findall(text)


@pytest.fixture
def tinyproxy(tmp_path: Path) -> Iterator[Tinyproxy]:
    """Start tinyproxy on 127.0.0.1 (any CONNECT port allowed, no Via header games)."""
    binary = shutil.which("tinyproxy") or "/usr/bin/tinyproxy"
    assert Path(binary).exists(), "tinyproxy is missing: run `make system-deps`"
    port = free_port()
    log = tmp_path / "tinyproxy.log"
    config = tmp_path / "tinyproxy.conf"
    config.write_text(
        f"Port {port}\nListen 127.0.0.1\nTimeout 60\nMaxClients 100\nAllow 127.0.0.1\n"
        f'LogFile "{log}"\nLogLevel Connect\n')
    proc = subprocess.Popen([binary, "-d", "-c", str(config)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert proc.poll() is None, f"tinyproxy exited with {proc.returncode}"
            assert time.monotonic() < deadline, "tinyproxy did not start listening"
            time.sleep(0.05)
    yield Tinyproxy(f"http://127.0.0.1:{port}", log, proc)
    stop_process(proc)


def _standin_saw(glance: GlanceStandin, path: str,
                 download_checks: bool = False) -> list[dict[str, str]]:
    """Headers of the requests the stand-in answered for ``path``: without the one-byte
    download checks of the data path, or (``download_checks``) only those."""
    return [r.headers for r in glance.requests if r.path == path
            and (r.headers.get("Range") == "bytes=0-0") == download_checks]


async def test_fills_go_through_the_proxy_and_authorization_does_not(
    glance: GlanceStandin, imgcache_factory: ImgcacheFactory, tinyproxy: Tinyproxy
) -> None:
    image = await glance.add_image(size=8 * MiB)
    imgcache: Imgcache = await imgcache_factory(proxy=tinyproxy.url)
    status, headers, body = await imgcache.get(image.id)
    assert status == 200 and headers["X-Cache-Status"] == "MISS"
    assert hashlib.sha512(body).hexdigest() == image.os_hash_value
    await imgcache.wait_for_metric('imgcache_fills_total{outcome="committed"}', 1)
    status, headers, _ = await imgcache.get(image.id, token=None)  # no token: denied
    assert status == 401

    data_path, meta_path = f"/v2/images/{image.id}/file", f"/v2/images/{image.id}"
    # The proxy's own log: the data GET went through it, the metadata GETs did not.
    assert (await tinyproxy.requests()) == [("GET", f"{glance.url}{data_path}")]
    # Glance's side agrees: tinyproxy adds a Via header to what it forwards.
    data_gets = _standin_saw(glance, data_path)
    meta_gets = _standin_saw(glance, meta_path)
    checks = _standin_saw(glance, data_path, download_checks=True)
    assert len(data_gets) == 1 and "tinyproxy" in data_gets[0].get("Via", "")
    assert len(meta_gets) == 2 and all("Via" not in h for h in meta_gets)
    assert len(checks) == 2 and all("Via" not in h for h in checks)


async def test_other_requests_do_not_go_through_the_proxy(
    glance: GlanceStandin, imgcache_factory: ImgcacheFactory, tinyproxy: Tinyproxy
) -> None:
    await glance.add_image(size=MiB)
    imgcache = await imgcache_factory(proxy=tinyproxy.url)
    async with imgcache.session.get(f"{imgcache.url}/v2/images",
                                    headers={"X-Auth-Token": TOKEN}) as response:
        assert response.status == 200
    async with imgcache.session.post(f"{imgcache.url}/_standin/echo", data=b"x" * 1000,
                                     headers={"X-Auth-Token": TOKEN}) as response:
        assert response.status == 200
    assert await tinyproxy.requests() == []


async def test_bypassed_downloads_go_through_the_proxy_too(
    glance: GlanceStandin, imgcache_factory: ImgcacheFactory, tinyproxy: Tinyproxy
) -> None:
    image = await glance.add_image(size=3 * MiB)
    imgcache = await imgcache_factory(proxy=tinyproxy.url, max_size="1M")
    status, headers, body = await imgcache.get(image.id)
    assert status == 200 and headers["X-Cache-Status"] == "BYPASS"
    assert hashlib.sha512(body).hexdigest() == image.os_hash_value
    assert await tinyproxy.requests() == [("GET", f"{glance.url}/v2/images/{image.id}/file")]


async def test_a_dead_proxy_fails_the_fill_but_not_the_metadata(
    glance: GlanceStandin, imgcache_factory: ImgcacheFactory, unused_tcp_port: int
) -> None:
    image = await glance.add_image(size=MiB)
    imgcache = await imgcache_factory(proxy=f"http://127.0.0.1:{unused_tcp_port}",
                                      retries="0")
    async with imgcache.session.get(f"{imgcache.url}/v2/images/{image.id}",
                                    headers={"X-Auth-Token": TOKEN}) as response:
        assert response.status == 200  # metadata: straight to Glance
    # No byte could come: a 503 naming the proxy, which Nova's retries take as Glance's.
    status, _, body = await imgcache.get(image.id)
    assert status == 503 and b"image-data proxy" in body
    await imgcache.wait_for_metric('imgcache_fills_total{outcome="upstream_error"}', 1)
    assert (await imgcache.metrics())['imgcache_upstream_errors_total{kind="connect"}'] >= 1
    assert _standin_saw(glance, f"/v2/images/{image.id}/file") == []


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    """A test CA and a server certificate for 127.0.0.1."""
    return make_pki(tmp_path / "pki")


@pytest.fixture
async def tls_glance(tmp_path: Path, pki: Pki) -> AsyncIterator[GlanceStandin]:
    """An https Glance stand-in."""
    data = tmp_path / "tls-glance"
    await asyncio.to_thread(data.mkdir)
    standin = GlanceStandin(data, tokens=(TOKEN,), ssl_context=pki.server_context())
    await standin.start()
    yield standin
    await standin.stop()


async def test_https_fills_tunnel_through_the_proxy_and_are_verified(
    tls_glance: GlanceStandin, imgcache_factory: ImgcacheFactory, tinyproxy: Tinyproxy,
    pki: Pki
) -> None:
    image = await tls_glance.add_image(size=2 * MiB)
    imgcache = await imgcache_factory(upstream=tls_glance.url, ca_file=str(pki.ca_file),
                                      proxy=tinyproxy.url)
    status, _, body = await imgcache.get(image.id)
    assert status == 200
    assert hashlib.sha512(body).hexdigest() == image.os_hash_value
    # The proxy saw only a CONNECT tunnel to Glance (TLS inside is imgcache's, verified
    # against ca_file); the metadata GET did not touch it.
    assert await tinyproxy.requests() == [("CONNECT", f"127.0.0.1:{tls_glance.port}")]
