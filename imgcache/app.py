"""Wiring: build the proxy, metrics and management apps from settings; start, reload, drain
and stop them."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import ssl
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, fields

import uvloop
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from imgcache.admin import bind_admin_socket, create_admin_app, set_socket_access
from imgcache.authorize import Authorizer
from imgcache.config import Settings, format_size, parse_duration
from imgcache.errors import ConfigError
from imgcache.fill import FillRegistry
from imgcache.glance_cache import CACHE_API, CacheApi, serve_cache_api, serve_versions
from imgcache.handlers import SERVICES, Services, dispatch
from imgcache.health import readiness
from imgcache.history import AccessHistory, ServerState
from imgcache.keystone import KeystoneRoles
from imgcache.logs import setup_logging
from imgcache.loopthreads import LoopThreads
from imgcache.metrics import WORKING_SET_WINDOWS, Metrics
from imgcache.notify import SystemdNotifier
from imgcache.openfiles import OpenFiles
from imgcache.predictions import Predictions
from imgcache.prefetch import Prefetcher
from imgcache.responses import FileSender
from imgcache.store import Store
from imgcache.threadnames import FILES, PIPELINE, SENDING, named_executor
from imgcache.threadpool import SparePool
from imgcache.tier import Tier
from imgcache.upstream import Upstream, tls_context
from imgcache.verify import Verifier

log = logging.getLogger(__name__)

#: Worker threads for sending (each call is short: at most responses.MAX_BYTES_PER_CALL, and
#: WRITABLE_WAIT_SECONDS of a slow client's full socket; longer only while the disk answers
#: a read). Eight: each holds at most one window of mapped_windows at a time, so together they
#: stay under its bound, and the readers of a download get copies of every stretch it
#: finished, never sendfile for want of room. With 32, a third of a storm's bytes went by
#: sendfile for that reason, and storms and 1 MiB hits were slower (README, "Readers of a
#: download in flight"). Eight threads are also eight disk reads at a time for hits whose
#: files are not in the page cache, and, at nice +10, a smaller share of the CPU than 32
#: would get against busy threads of the same cgroup (a systemd service's share of the
#: host comes from its cgroup's weight, not from its thread count).
FILE_THREADS = 8
#: Nice value of those threads, above the event loop's: in a boot storm all of them copy
#: bytes at once, and at equal priority the loop (one thread answering every client) would
#: wait behind all of them for a CPU, and new clients for their first byte.
FILE_THREADS_NICE = 10
#: Worker threads for file opens, creates, closes, deletes and commits: a pool apart from
#: the senders', so that none of these waits behind multi-GB sends.
CONTROL_THREADS = 8
#: Threads that write and hash downloads (two per fill, one per stream verified on its way
#: to a client); PIPELINE_THREADS_STARTED of them start before serving, and the pool's own
#: starter thread keeps PIPELINE_THREADS_SPARE idle (``threadpool.SparePool``: a thread start
#: holds its caller until the new thread runs, and the loop must never be that caller).
PIPELINE_THREADS = 256
PIPELINE_THREADS_STARTED = 16
PIPELINE_THREADS_SPARE = 8
#: Biggest request head a client may send (request line plus headers).
MAX_HEADER_BYTES = 64 * 1024
#: The proxy app's sizing jobs (for the management API).
PREDICTIONS = web.AppKey("predictions", Predictions)
#: Settings a SIGHUP applies to the running server; the others need a restart.
#: Settings that are byte counts (logged in human units).
SIZE_SETTINGS = frozenset({"max_size", "scrub_rate"})
RELOADABLE = frozenset({"max_size", "decision_ttl", "policy_check", "log_level",
                        "log_format", "retries", "retry_backoff"})


def _yield_to_the_loop() -> None:
    """Runs first on each file thread: lower its priority below the event loop's (a thread's
    nice value is its own on Linux). Where that is not allowed, it keeps the loop's."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(),
                       os.getpriority(os.PRIO_PROCESS, 0) + FILE_THREADS_NICE)


def _stop_threads(senders: LoopThreads, *pools: Executor) -> None:
    """End the sending threads and the pools (without waiting for them)."""
    senders.shutdown()
    for pool in pools:
        pool.shutdown(wait=False, cancel_futures=True)


async def _start_every_thread(threads: ThreadPoolExecutor, count: int) -> None:
    """Start all ``count`` threads of the pool now, before serving: left to itself the pool
    starts them one per busy moment, and each start holds the loop until the new thread
    first runs, which under a storm's load takes milliseconds."""
    all_started = threading.Barrier(count, timeout=30)
    loop = asyncio.get_running_loop()
    await asyncio.gather(*(loop.run_in_executor(threads, all_started.wait)
                           for _ in range(count)))


def create_app(settings: Settings, metrics: Metrics | None = None) -> web.Application:
    """The proxy application: its services start with the app and close with it."""
    app = web.Application(handler_args={"max_field_size": MAX_HEADER_BYTES,
                                        "max_line_size": MAX_HEADER_BYTES})
    metrics = metrics or Metrics()

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        # Reads the CA, certificate and key files: off the loop, before anything is served;
        # a bad file stops start-up (ConfigError) before anything is opened.
        tls = await asyncio.to_thread(tls_context, settings)
        senders = LoopThreads(FILE_THREADS, SENDING, initializer=_yield_to_the_loop)
        control = named_executor(CONTROL_THREADS, FILES)
        pipeline = SparePool(PIPELINE_THREADS, started=PIPELINE_THREADS_STARTED,
                             spare=PIPELINE_THREADS_SPARE, name=PIPELINE)
        # What was opened is closed, last first, at shutdown and also when a start-up step
        # fails or the start is cancelled: aiohttp runs no cleanup for a context that never
        # yielded.
        opened = contextlib.AsyncExitStack()
        try:
            starts = await asyncio.gather(asyncio.to_thread(senders.start),
                                          _start_every_thread(control, CONTROL_THREADS),
                                          asyncio.to_thread(pipeline.start),
                                          return_exceptions=True)
            failed = [outcome for outcome in starts if isinstance(outcome, BaseException)]
            if failed:  # every start is over (none is left starting threads): say what failed
                raise failed[0]
            upstream = Upstream(settings.upstream, connect_timeout=settings.connect_timeout,
                                read_timeout=settings.read_timeout, metrics=metrics,
                                proxy=settings.proxy, ssl_context=tls)
            store = Store(settings.cache_dir, settings.max_size, metrics, control)
            open_files = OpenFiles(control)
            store.add_removal_listener(lambda entry: open_files.retire(entry.file_name))
            await store.open()
            opened.push_async_callback(store.close)
            opened.push_async_callback(open_files.close)

            def server_state() -> ServerState:
                return ServerState(store.max_bytes, {e.image_id: e.size for e in store.entries()
                                                     if e.pinned})

            history = AccessHistory(settings.cache_dir / "history",
                                    settings.history_max_requests, server_state)
            await history.open()
            opened.push_async_callback(history.close)
            for window in WORKING_SET_WINDOWS:
                seconds = parse_duration(window)
                metrics.working_set_bytes.labels(window).set_function(
                    lambda seconds=seconds: history.working_set_bytes(seconds))
            predictions = Predictions(history, server_state, metrics)
            app[PREDICTIONS] = predictions
            await upstream.start()
            opened.push_async_callback(upstream.close)
            authorizer = Authorizer(upstream, settings.decision_ttl, metrics,
                                    settings.policy_check)
            tier = _tier(settings, metrics, tls)
            if tier is not None:
                await tier.start()
                opened.push_async_callback(tier.close)
            fills = FillRegistry(store, upstream, metrics, control, pipeline,
                                 retries=settings.retries, retry_backoff=settings.retry_backoff,
                                 tier=tier)
            verifier = Verifier(store, metrics)
            services = Services(
                upstream=upstream,
                authorizer=authorizer,
                store=store,
                open_files=open_files,
                fills=fills,
                sender=FileSender(senders, metrics),
                metrics=metrics,
                prefetcher=Prefetcher(authorizer, store, fills, metrics,
                                      settings.prefetch_concurrency),
                verifier=verifier,
                pipeline=pipeline,
                history=history,
            )
            app[SERVICES] = services
            roles = KeystoneRoles(upstream, settings.cache_api_roles, settings.keystone_url,
                                  settings.decision_ttl, connect_timeout=settings.connect_timeout,
                                  read_timeout=settings.read_timeout, ssl_context=tls)
            await roles.start()
            opened.push_async_callback(roles.close)
            app[CACHE_API] = CacheApi(roles)
            loop = asyncio.get_running_loop()
            background = [
                loop.create_task(verifier.scrub_forever(settings.scrub_interval,
                                                        settings.scrub_rate))
                if settings.scrub_interval else None,
                loop.create_task(predictions.update_forever(settings.predict_interval))
                if settings.predict_interval and history.enabled else None,
            ]
        except BaseException:
            with contextlib.suppress(Exception):
                await opened.aclose()
            _stop_threads(senders, control, pipeline)
            raise
        yield
        for task in background:
            if task is not None:
                task.cancel()
        await services.prefetcher.close()
        await fills.close()
        verifier.close()
        await opened.aclose()
        _stop_threads(senders, control, pipeline)

    app.cleanup_ctx.append(lifecycle)
    if settings.cache_api_roles:  # Glance's cache API; with no role it goes to Glance
        app.router.add_route("*", "/v2/cache{tail:(/.*)?}", serve_cache_api)
        for path in ("/", "/versions"):
            app.router.add_get(path, serve_versions, allow_head=False)
    app.router.add_route("*", "/{tail:.*}", dispatch)
    return app


def _tier(settings: Settings, metrics: Metrics, tls: ssl.SSLContext) -> Tier | None:
    """The shared tier of ``[tier] urls``, or None when none is configured."""
    if not settings.tier_urls:
        return None
    return Tier(settings.tier_urls, metrics, connect_timeout=settings.tier_connect_timeout,
                read_timeout=settings.tier_read_timeout, backoff=settings.tier_backoff,
                ssl_context=tls)


def create_metrics_app(metrics: Metrics,
                       ready: Callable[[], Awaitable[tuple[bool, dict[str, str]]]]
                       ) -> web.Application:
    """The Prometheus listener: ``/metrics``, ``/healthz`` (liveness) and ``/readyz``
    (readiness: ``ready()`` says whether Glance answers and the cache takes writes)."""
    app = web.Application()

    async def serve_metrics(_: web.Request) -> web.Response:
        body = generate_latest(metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        is_ready, checks = await ready()
        return web.json_response({"status": "ready" if is_ready else "not ready",
                                  "checks": checks}, status=200 if is_ready else 503)

    app.router.add_get("/metrics", serve_metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


@dataclass
class Running:
    """A running imgcache: its addresses (ports resolved when 0 was asked) and apps."""

    proxy_url: str
    metrics_url: str
    proxy_app: web.Application

    @property
    def services(self) -> Services:
        """The proxy's services (store, fills, ...)."""
        return self.proxy_app[SERVICES]


@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[Running]:
    """Serve the proxy, the metrics listener and the management socket until the block
    exits; then stop accepting, let downloads finish for ``drain_grace``, and close."""
    metrics = Metrics()
    proxy_app = create_app(settings, metrics)
    proxy = web.AppRunner(proxy_app, access_log=None, shutdown_timeout=settings.drain_grace)
    monitor = web.AppRunner(
        create_metrics_app(metrics, lambda: readiness(proxy_app[SERVICES])), access_log=None)
    await proxy.setup()
    admin: web.AppRunner | None = None
    try:
        await monitor.setup()
        gid = await bind_admin_socket(settings.admin_socket, settings.admin_socket_mode,
                                      settings.admin_socket_group)
        admin = web.AppRunner(create_admin_app(proxy_app[SERVICES], proxy_app[PREDICTIONS],
                                               gid), access_log=None)
        await admin.setup()
        await web.UnixSite(admin, str(settings.admin_socket)).start()
        await asyncio.to_thread(set_socket_access, settings.admin_socket,
                                settings.admin_socket_mode, gid)
        await web.TCPSite(proxy, *settings.listen, backlog=1024, reuse_address=True).start()
        await web.TCPSite(monitor, *settings.metrics_listen, reuse_address=True).start()
        yield Running(_url(proxy), _url(monitor), proxy_app)
    finally:
        if admin is not None:
            await admin.cleanup()
        await monitor.cleanup()
        await proxy.cleanup()  # waits up to drain_grace for running downloads


def _url(runner: web.AppRunner) -> str:
    host, port = runner.addresses[0][:2]
    return f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"


def _shown(name: str, value: object) -> str:
    """A setting's value for the reload log: sizes in human units."""
    if name in SIZE_SETTINGS and isinstance(value, int):
        return format_size(value)
    return repr(value)


def apply_reload(served: Running, old: Settings, new: Settings) -> Settings:
    """Apply what a SIGHUP may change live; log each change and what needs a restart."""
    services = served.services
    changed = [f.name for f in fields(Settings) if getattr(old, f.name) != getattr(new, f.name)]
    for name in changed:
        if name not in RELOADABLE:
            log.warning("reload: %s changed but needs a restart to apply; keeping %r",
                        name, getattr(old, name))
            continue
        log.info("reload: %s %s -> %s", name, _shown(name, getattr(old, name)),
                 _shown(name, getattr(new, name)))
    if not changed:
        log.info("reload: configuration unchanged")
    applied = {name: getattr(new, name) for name in changed if name in RELOADABLE}
    if "max_size" in applied:
        services.store.set_max_bytes(new.max_size)
    if "decision_ttl" in applied:
        services.authorizer.set_ttl(new.decision_ttl)
        served.proxy_app[CACHE_API].roles.set_ttl(new.decision_ttl)
    if "policy_check" in applied:
        services.authorizer.set_policy_check(new.policy_check)
    if {"retries", "retry_backoff"} & applied.keys():
        services.fills.set_retry_policy(new.retries, new.retry_backoff)
    if {"log_level", "log_format"} & applied.keys():
        setup_logging(new.log_level, new.log_format)
    kept = {name: getattr(old, name) for name in changed if name not in RELOADABLE}
    return Settings(**{**{f.name: getattr(new, f.name) for f in fields(Settings)}, **kept})


async def serve_forever(settings: Settings, reload: Callable[[], Settings]) -> None:
    """Serve until SIGTERM or SIGINT (then drain); SIGHUP re-reads the configuration."""
    received: asyncio.Queue[signal.Signals] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, received.put_nowait, sig)
    notifier = SystemdNotifier()
    try:
        async with running(settings) as served:
            log.info("imgcache serving %s in front of %s (cache %s, cap %s); metrics "
                     "at %s/metrics; management socket %s", served.proxy_url,
                     ", ".join(settings.upstream), settings.cache_dir,
                     format_size(settings.max_size),
                     served.metrics_url, settings.admin_socket)
            # What start-up made lives as long as the server: out of the collector's
            # sight, a full collection walks only what requests made since.
            gc.freeze()
            notifier.ready(f"serving {served.proxy_url}")
            watchdog = asyncio.ensure_future(notifier.watchdog())
            while await received.get() == signal.SIGHUP:
                try:
                    settings = apply_reload(served, settings, reload())
                except ConfigError as exc:
                    log.error("reload refused, the running configuration is kept: %s", exc)
            notifier.stopping(f"draining for up to {settings.drain_grace:.0f} s")
            log.info("stopping: no new connections; running downloads get %.0f s to "
                     "finish", settings.drain_grace)
            watchdog.cancel()
    finally:
        notifier.close()
    log.info("stopped")


def run(settings: Settings, reload: Callable[[], Settings]) -> None:
    """Serve ``settings`` on uvloop until a stop signal."""
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(serve_forever(settings, reload))
