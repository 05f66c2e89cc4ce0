"""Readiness: can this imgcache do its job now? Glance answers, and the cache directory
takes writes. (Liveness, ``/healthz``, only says the process serves.)"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from imgcache.errors import ImgcacheError
from imgcache.handlers import Services

#: Longest a readiness check waits for Glance (probes of orchestrators time out in seconds).
GLANCE_PROBE_TIMEOUT = 5.0


def probe_writable(directory: Path) -> None:
    """Runs on a thread: create, write and remove a small file in ``directory``; raises
    OSError when that fails."""
    probe = directory / f".readyz-{os.getpid()}"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, b"ok")
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)


async def readiness(services: Services) -> tuple[bool, dict[str, str]]:
    """Whether imgcache is ready, and each check's finding (``ok ...`` or what failed)."""
    glance, cache = await asyncio.gather(_glance(services), _cache_dir(services))
    checks = {"glance": glance, "cache_dir": cache}
    return all(value.startswith("ok") for value in checks.values()), checks


async def _glance(services: Services) -> str:
    try:
        async with asyncio.timeout(GLANCE_PROBE_TIMEOUT):
            response = await services.upstream.request("GET", "/versions", {})
    except ImgcacheError as exc:
        return str(exc)
    except TimeoutError:
        return f"Glance did not answer within {GLANCE_PROBE_TIMEOUT:.0f} s"
    response.release()
    if response.status >= 500:
        return f"Glance answered {response.status} at {response.url.origin()}"
    return f"ok: {response.url.origin()} answered {response.status}"


async def _cache_dir(services: Services) -> str:
    directory = services.store.partial_dir
    try:
        await asyncio.to_thread(probe_writable, directory)
    except OSError as exc:
        return f"cannot write in {directory}: {exc.strerror or exc}"
    return f"ok: {services.store.cache_dir} is writable"
