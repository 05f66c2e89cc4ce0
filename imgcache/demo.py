"""``imgcache demo``: a boot storm through imgcache, with no Glance needed.

Starts a throwaway Glance stand-in holding one generated image, puts imgcache in front of
it, sends a cold storm of concurrent downloads and then a warm one, and prints what Glance
saw and what imgcache's metrics counted. Everything lives in a temporary directory.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import tempfile
import time
from pathlib import Path

import aiohttp
import uvloop
from prometheus_client.parser import text_string_to_metric_families

from imgcache.app import running
from imgcache.config import format_size, load_settings, parse_size
from imgcache.standin import GlanceStandin

TOKEN = "demo-token"


async def _download(session: aiohttp.ClientSession, url: str) -> tuple[str, str, float]:
    started = time.monotonic()
    digest = hashlib.sha512()
    async with session.get(url, headers={"X-Auth-Token": TOKEN}) as response:
        response.raise_for_status()
        async for chunk in response.content.iter_chunked(1 << 20):
            digest.update(chunk)
        return response.headers["X-Cache-Status"], digest.hexdigest(), \
            time.monotonic() - started


async def _samples(session: aiohttp.ClientSession, metrics_url: str) -> dict[str, float]:
    async with session.get(metrics_url + "/metrics") as response:
        text = await response.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sample.labels.items())
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


async def _storm(session: aiohttp.ClientSession, url: str, clients: int,
                 expected: str) -> str:
    started = time.monotonic()
    results = await asyncio.gather(*(_download(session, url) for _ in range(clients)))
    wall = time.monotonic() - started
    statuses: dict[str, int] = {}
    for status, _, _ in results:
        statuses[status] = statuses.get(status, 0) + 1
    verified = sum(digest == expected for _, digest, _ in results)
    return (f"{clients} clients in {wall:.2f}s, {verified} verified against Glance's sha512, "
            f"X-Cache-Status: " + ", ".join(f"{k} x{v}" for k, v in sorted(statuses.items())))


async def _demo(workdir: Path, clients: int, image_size: int) -> None:
    glance = GlanceStandin(workdir / "glance", tokens=(TOKEN,))
    await glance.start()
    try:
        image = await glance.add_image(size=image_size)
        print(f"Glance stand-in at {glance.url} holds image {image.id} ({format_size(image.size)})")
        settings = load_settings({
            "listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0", "upstream": glance.url,
            "cache_dir": str(workdir / "cache"), "max_size": str(4 * image_size),
            "admin_socket": str(workdir / "admin.sock"),
        }, environ={})
        async with running(settings) as served, aiohttp.ClientSession() as session:
            print(f"imgcache at {served.proxy_url}, metrics at {served.metrics_url}/metrics")
            url = f"{served.proxy_url}/v2/images/{image.id}/file"
            print("cold storm: " + await _storm(session, url, clients, image.os_hash_value))
            await served.services.fills.wait_idle()  # the image is committed
            print("warm storm: " + await _storm(session, url, clients, image.os_hash_value))
            samples = await _samples(session, served.metrics_url)
            print(f"Glance served {glance.data_gets(image.id)} image download(s) for "
                  f"{2 * clients} client downloads")
            served_bytes = sum(value for name, value in samples.items()
                               if name.startswith("imgcache_served_bytes_total"))
            for name in ('imgcache_requests_total{result="miss"}',
                         'imgcache_requests_total{result="coalesced"}',
                         'imgcache_requests_total{result="hit"}',
                         "imgcache_upstream_bytes_total"):
                print(f"  {name} = {samples[name]:.0f}")
            print(f"  imgcache_served_bytes_total (all results) = {served_bytes:.0f}")
            print(_summary(samples, served_bytes))
    finally:
        await glance.stop()


def _summary(samples: dict[str, float], served_bytes: float) -> str:
    """The two figures that matter: the hit ratio and the bytes Glance did not send."""
    counts = {r: samples[f'imgcache_requests_total{{result="{r}"}}']
              for r in ("hit", "miss", "coalesced", "bypass")}
    downloads = sum(counts.values())
    ratio = counts["hit"] / downloads if downloads else 0.0
    upstream = samples["imgcache_upstream_bytes_total"]
    return (f"hit ratio {ratio:.0%} ({counts['hit']:.0f} of {downloads:.0f} downloads served "
            f"from the cache, {counts['coalesced']:.0f} more joined a download in flight); "
            f"Glance sent {format_size(upstream)} for {format_size(served_bytes)} served: "
            f"{format_size(max(0.0, served_bytes - upstream))} it did not have to send")


def run_demo(clients: int = 16, image_size: str = "64M") -> int:
    """Run the demo in a temporary directory that is removed afterwards; return 0."""
    workdir = Path(tempfile.mkdtemp(prefix="imgcache-demo-"))
    try:
        (workdir / "glance").mkdir()
        uvloop.run(_demo(workdir, clients, parse_size(image_size)))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print("cleaned up", workdir)
    return 0
