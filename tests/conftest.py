"""Shared fixtures: every async test runs on uvloop with blockbuster watching the loop, and
talks to real servers: a Glance stand-in across the test network (the emulated link of
tests/netlink, or loopback where it cannot be made) and imgcache itself, on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import uvloop
from blockbuster import blockbuster_ctx
from inloop import OTHER_TOKEN, TOKEN, Imgcache, ImgcacheFactory
from netlink.link import Network

from imgcache.app import Running, running
from imgcache.config import load_settings
from imgcache.standin import GlanceStandin

pytest_plugins = ("netlink.fixtures",)  # the ``network`` fixture


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> Mapping[str, Any]:
    """Run every async test on uvloop, the loop imgcache runs on in production."""
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture(autouse=True)
def blockbuster(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail any async test whose event loop makes a blocking call (disk, SQLite, sleep)."""
    if not asyncio.iscoroutinefunction(getattr(request.node, "function", None)):
        yield
        return
    with blockbuster_ctx():
        yield


@pytest.fixture
def glance_dir(tmp_path: Path) -> Path:
    """Where the stand-in keeps its images (made here: blocking calls stay out of the loop)."""
    data = tmp_path / "glance"
    data.mkdir()
    return data


@pytest.fixture
async def glance(glance_dir: Path, network: Network) -> AsyncIterator[GlanceStandin]:
    """A Glance stand-in across the test network with two tokens (neither sees the other's
    images)."""
    standin = GlanceStandin(glance_dir, tokens=(TOKEN, OTHER_TOKEN), host=network.far_host,
                            sock=await network.listen_async())
    await standin.start()
    yield standin
    await standin.stop()





@pytest.fixture
async def imgcache_factory(
    tmp_path: Path, glance: GlanceStandin
) -> AsyncIterator[ImgcacheFactory]:
    """Start imgcache apps in front of the stand-in: ``await factory(max_size="1G", ...)``."""
    stack: list[Any] = []

    async def start(**flags: str) -> Imgcache:
        values = {
            "listen": "127.0.0.1:0",
            "metrics_listen": "127.0.0.1:0",
            "upstream": glance.url,
            "cache_dir": str(tmp_path / "cache"),
            "max_size": "1G",
            "admin_socket": str(tmp_path / f"admin-{len(stack)}.sock"),
        }
        values.update(flags)
        context = running(load_settings(values, environ={}))
        served: Running = await context.__aenter__()
        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120))
        stack.append((context, session))
        return Imgcache(served.proxy_url, served.metrics_url, served.services, session,
                        Path(values["cache_dir"]), Path(values["admin_socket"]))

    yield start
    for context, session in reversed(stack):
        await session.close()
        await context.__aexit__(None, None, None)


@pytest.fixture
async def imgcache(imgcache_factory: ImgcacheFactory) -> Imgcache:
    """imgcache with a 1 GiB cap in front of the stand-in."""
    return await imgcache_factory()
