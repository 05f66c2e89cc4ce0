"""imgcache running in a test's own event loop, and the client helpers tests use with it
(the fixtures that build it are in conftest.py)."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from imgcache.handlers import Services

TOKEN = "token-a"
OTHER_TOKEN = "token-b"


@dataclass
class Imgcache:
    """An imgcache app running in the test's loop, and a client session to it."""

    url: str
    metrics_url: str
    services: Services
    session: aiohttp.ClientSession
    cache_dir: Path
    admin_socket: Path

    def data_url(self, image_id: str) -> str:
        """URL of an image's data through imgcache."""
        return f"{self.url}/v2/images/{image_id}/file"

    async def data_files(self) -> list[str]:
        """Names of the committed image files on disk (listed off the loop)."""
        return sorted(await asyncio.to_thread(os.listdir, self.cache_dir / "data"))

    async def metrics(self) -> dict[str, float]:
        """The current Prometheus samples, name{labels} -> value."""
        async with self.session.get(self.metrics_url + "/metrics") as response:
            text = await response.text()
        samples = {}
        for line in text.splitlines():
            match = re.match(r"^(imgcache_\S+) (\S+)$", line)
            if match:
                samples[match.group(1)] = float(match.group(2))
        return samples

    async def wait_for_metric(self, name: str, value: float, timeout: float = 30) -> None:
        """Wait until a sample reaches ``value`` (fills commit after clients finish)."""
        async with asyncio.timeout(timeout):
            while (await self.metrics()).get(name, 0) < value:
                await asyncio.sleep(0.02)

    async def get(self, image_id: str, token: str | None = TOKEN,
                  headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        """Download an image through imgcache: status, headers and the whole body."""
        all_headers = {"X-Auth-Token": token} if token else {}
        all_headers.update(headers or {})
        async with self.session.get(self.data_url(image_id), headers=all_headers) as response:
            body = await response.read()
            return response.status, dict(response.headers), body


async def storm(imgcache: Imgcache, image_id: str, clients: int = 6) -> list[bytes]:
    """``clients`` downloads of one image at once; each must answer 200. Their bodies."""

    async def one() -> bytes:
        status, _, body = await imgcache.get(image_id)
        assert status == 200
        return body

    return await asyncio.gather(*(one() for _ in range(clients)))


ImgcacheFactory = Callable[..., Any]
