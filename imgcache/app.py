"""Wiring: build the proxy app and the metrics app from settings, start and stop them."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass

import uvloop
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from imgcache.authorize import Authorizer
from imgcache.config import Settings
from imgcache.fill import FillRegistry
from imgcache.handlers import SERVICES, Services, dispatch
from imgcache.metrics import Metrics
from imgcache.responses import ZeroCopySender
from imgcache.store import Store
from imgcache.upstream import Upstream

log = logging.getLogger(__name__)

#: Worker threads for file opens, deletes and sendfile calls (each call is short: it ends
#: when a socket buffer is full).
FILE_THREADS = 32
#: Biggest request head a client may send (request line plus headers).
MAX_HEADER_BYTES = 64 * 1024


def create_app(settings: Settings, metrics: Metrics | None = None) -> web.Application:
    """The proxy application: its services start with the app and close with it."""
    app = web.Application(handler_args={"max_field_size": MAX_HEADER_BYTES,
                                        "max_line_size": MAX_HEADER_BYTES})
    metrics = metrics or Metrics()

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        files = ThreadPoolExecutor(FILE_THREADS, thread_name_prefix="imgcache-files")
        upstream = Upstream(settings.upstream, connect_timeout=settings.connect_timeout,
                            read_timeout=settings.read_timeout, metrics=metrics)
        store = Store(settings.cache_dir, settings.max_size, metrics, files)
        await store.open()
        await upstream.start()
        services = Services(
            upstream=upstream,
            authorizer=Authorizer(upstream, settings.decision_ttl, metrics),
            store=store,
            fills=FillRegistry(store, upstream, metrics, files, retries=settings.retries,
                               retry_backoff=settings.retry_backoff),
            sender=ZeroCopySender(files),
            metrics=metrics,
        )
        app[SERVICES] = services
        yield
        await services.fills.close()
        await upstream.close()
        await store.close()
        files.shutdown(wait=False, cancel_futures=True)

    app.cleanup_ctx.append(lifecycle)
    app.router.add_route("*", "/{tail:.*}", dispatch)
    return app


def create_metrics_app(metrics: Metrics) -> web.Application:
    """The Prometheus listener: ``/metrics`` and ``/healthz``."""
    app = web.Application()

    async def serve_metrics(_: web.Request) -> web.Response:
        body = generate_latest(metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app.router.add_get("/metrics", serve_metrics)
    app.router.add_get("/healthz", healthz)
    return app


@dataclass
class Running:
    """The addresses a running imgcache listens on (ports resolved when 0 was asked)."""

    proxy_url: str
    metrics_url: str
    proxy_app: web.Application


@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[Running]:
    """Serve the proxy and the metrics listener until the block exits."""
    metrics = Metrics()
    proxy_app = create_app(settings, metrics)
    proxy = web.AppRunner(proxy_app, access_log=None, shutdown_timeout=5)
    monitor = web.AppRunner(create_metrics_app(metrics), access_log=None)
    await proxy.setup()
    await monitor.setup()
    try:
        proxy_site = web.TCPSite(proxy, *settings.listen, backlog=1024, reuse_address=True)
        monitor_site = web.TCPSite(monitor, *settings.metrics_listen, reuse_address=True)
        await proxy_site.start()
        await monitor_site.start()
        yield Running(_url(proxy), _url(monitor), proxy_app)
    finally:
        await monitor.cleanup()
        await proxy.cleanup()


def _url(runner: web.AppRunner) -> str:
    host, port = runner.addresses[0][:2]
    return f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"


async def serve_forever(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with running(settings) as served:
        log.info("imgcache serving %s in front of %s (cache %s, cap %d bytes); metrics at %s",
                 served.proxy_url, ", ".join(settings.upstream), settings.cache_dir,
                 settings.max_size, served.metrics_url + "/metrics")
        await stop.wait()
        log.info("stopping")


def run(settings: Settings) -> None:
    """Serve ``settings`` on uvloop until a stop signal."""
    uvloop.run(serve_forever(settings))
