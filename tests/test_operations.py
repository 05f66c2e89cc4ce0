"""What an operator reads: the access log's status for imgcache's own errors, and the
readiness endpoint beside /healthz (Glance reachable, cache directory writable)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from pathlib import Path

import pytest
from inloop import Imgcache, ImgcacheFactory

from imgcache.standin import GlanceStandin


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def access_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "imgcache.access"
            and r.getMessage().startswith("image request")]


async def test_access_log_shows_the_status_imgcache_sent(
    imgcache_factory: ImgcacheFactory, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="imgcache.access")
    server: Imgcache = await imgcache_factory(upstream=f"http://127.0.0.1:{closed_port()}")
    status, _, body = await server.get("0d9c7a0e-5b8e-4c8e-9f5e-3f1c2b1a0d9e")
    assert status == 503 and b"cannot connect to Glance" in body
    status, _, _ = await server.get("not-a-uuid")
    assert status == 400
    logged = access_lines(caplog)
    assert [r.status for r in logged] == [503, 400]  # type: ignore[attr-defined]
    assert "status=503" in logged[0].getMessage() and "status=0" not in logged[0].getMessage()


async def test_readyz_reports_glance_and_the_cache_directory(
    glance: GlanceStandin, imgcache_factory: ImgcacheFactory, tmp_path: Path,
) -> None:
    server: Imgcache = await imgcache_factory()
    async with server.session.get(server.metrics_url + "/readyz") as response:
        assert response.status == 200
        doc = await response.json()
    assert doc["status"] == "ready"
    assert doc["checks"]["glance"].startswith("ok") and glance.url in doc["checks"]["glance"]
    assert doc["checks"]["cache_dir"].startswith("ok")
    # No probe file is left behind.
    assert await asyncio.to_thread(os.listdir, server.cache_dir / "partial") == []

    # The cache directory removed under the server: not ready, liveness unchanged.
    partial = server.cache_dir / "partial"
    moved = tmp_path / "partial-moved"
    await asyncio.to_thread(partial.rename, moved)
    try:
        async with server.session.get(server.metrics_url + "/readyz") as response:
            assert response.status == 503
            doc = await response.json()
        assert doc["status"] == "not ready"
        assert doc["checks"]["glance"].startswith("ok")
        assert f"cannot write in {partial}" in doc["checks"]["cache_dir"]
        async with server.session.get(server.metrics_url + "/healthz") as response:
            assert response.status == 200
    finally:
        await asyncio.to_thread(moved.rename, partial)


async def test_readyz_not_ready_while_glance_is_unreachable(
    imgcache_factory: ImgcacheFactory,
) -> None:
    nowhere = f"http://127.0.0.1:{closed_port()}"
    server: Imgcache = await imgcache_factory(upstream=nowhere)
    async with server.session.get(server.metrics_url + "/readyz") as response:
        assert response.status == 503
        doc = await response.json()
    assert doc["status"] == "not ready"
    assert "cannot connect to Glance" in doc["checks"]["glance"] and nowhere in \
        doc["checks"]["glance"]
    assert doc["checks"]["cache_dir"].startswith("ok")
    async with server.session.get(server.metrics_url + "/healthz") as response:
        assert response.status == 200  # alive, just not ready
