"""The measurements of the peer comparison (``run.py``): imgcache against nginx
proxy_cache (two lock settings), Varnish and a direct download, all driven by the same C
clients (curl processes; wrk for small requests), each figure a sample of a series that the
report turns into medians and ratios.
"""

from __future__ import annotations

import math
import resource
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench.common.checks import (
    Checks,
    check_batch,
    check_download,
    verified_indices,
    verify_bodies,
)
from bench.common.curls import Batch, Download, data_url, download, run_batch
from bench.common.glance_nginx import Nginx, Route
from bench.common.images import TestImage
from bench.common.imgcache_server import Imgcache
from bench.common.lifecycle import progress, settle
from bench.common.procs import (
    Processes,
    cpu_seconds,
    machine_cpu,
    peak_rss,
    reset_peak_rss,
    threads_schedstat,
    write_bytes,
)
from bench.common.wrk import run_wrk
from imgcache.mapped_windows import MAPPED
from imgcache.threadnames import HASHING, SENDING, WRITING

IMGCACHE, NGINX, NGINX_1H, VARNISH, DIRECT = "imgcache", "nginx", "nginx-1h", "varnish", "direct"
#: imgcache's threads measured apart, by role: the event loop, then by the names the OS
#: shows for them (imgcache.threadnames).
THREAD_ROLES = ("loop", "hash", "write", "send")
_ROLE_OF_NAME = {HASHING: "hash", WRITING: "write", SENDING: "send"}
#: Pseudo-contenders of the bounds measured in the same run.
BOUND = "bound"


@dataclass
class Contender:
    """Something clients download images through: a cache, or the upstream itself."""

    name: str
    kind: str  # "imgcache", "cache" or "direct"
    urls: dict[str, str]  # upstream name -> base URL of this contender in front of it
    pids: Callable[[], list[int]]  # its processes, for /proc/PID/io

    @property
    def is_cache(self) -> bool:
        """Whether it caches (imgcache or a peer cache)."""
        return self.kind != "direct"


@dataclass
class Upstream:
    """Where the contenders fetch from: a Glance stand-in server, or a real glance-api."""

    name: str
    label: str  # for the report, e.g. "stand-in, 1 Gbit/s link"
    data_requests: Callable[[str], list[int]]  # bytes of each logged data GET (-1: unknown)
    metadata_gets: Callable[[str], int]
    bits: int | None = None  # link bandwidth in bits/s (None: not held)
    pids: Callable[[], list[int]] = list  # its processes, for CPU accounting


class Routes:
    """Image ids exposed by the stand-in: per image a fixed id (direct downloads, hits) and
    a pool of fresh ids, one per cold measurement, so no cache has ever seen it."""

    def __init__(self) -> None:
        self.fixed: dict[str, Route] = {}
        self._fresh: dict[str, list[Route]] = {}

    def add(self, key: str, image: TestImage, fresh: int, new_id: Callable[[], str]) -> None:
        """Expose ``image`` as ``key`` under one fixed id and ``fresh`` fresh ones."""
        self.fixed[key] = Route(new_id(), image)
        self._fresh[key] = [Route(new_id(), image) for _ in range(fresh)]

    def fresh(self, key: str) -> Route:
        """An id of ``key``'s image that no measurement has used."""
        return self._fresh[key].pop()

    def all(self) -> list[Route]:
        """Every route, for the stand-in's config."""
        return [*self.fixed.values(), *(r for pool in self._fresh.values() for r in pool)]


@dataclass
class Results:
    """Samples per metric and contender, in run order, plus notes for the report."""

    series: dict[str, dict[str, list[float]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(list)))
    notes: list[str] = field(default_factory=list)

    def add(self, metric: str, contender: str, value: float) -> None:
        """Record one sample."""
        self.series[metric][contender].append(value)

    def get(self, metric: str, contender: str) -> list[float]:
        """The samples of one metric and contender ([] when none)."""
        return list(self.series.get(metric, {}).get(contender, []))

    def median(self, metric: str, contender: str) -> float:
        """Median of the samples (nan when none)."""
        values = self.get(metric, contender)
        return statistics.median(values) if values else math.nan


@dataclass
class PeerBench:
    """What the measurements run against."""

    procs: Processes
    standin: Nginx
    contenders: dict[str, Contender]
    imgcaches: dict[str, Imgcache]  # one per upstream name
    upstreams: dict[str, Upstream]
    routes: Routes
    checks: Checks
    scratch: Path
    wrk: str
    results: Results


def rotated(names: list[str], rep: int) -> list[str]:
    """``names`` starting at a different one every repetition (none always goes first)."""
    shift = rep % len(names)
    return names[shift:] + names[:shift]


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile (p99 of 32 values is the largest)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


def wait_logged(counter: Callable[[], list[int]], timeout: float = 10.0) -> list[int]:
    """Upstream log entries once their number has been stable for 0.3 s (the
    upstream logs a request when it ends, which may trail the client's last byte)."""
    deadline = time.monotonic() + timeout
    last, stable_since = counter(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = counter()
        if len(now) != len(last):
            last, stable_since = now, time.monotonic()
        elif last and time.monotonic() - stable_since >= 0.3:
            break
    return last


@dataclass(frozen=True)
class Usage:
    """CPU used over an interval: by the contender's processes (all threads), by the
    clients (the curl processes, waited for meanwhile), by the upstream, by the whole
    machine, and by imgcache's threads by role (THREAD_ROLES: on a CPU, and runnable but
    waiting for one)."""

    seconds: float
    cpu: float
    clients: float
    upstream: float
    busy_cpu: float  # CPU seconds the whole machine was busy (other work included)
    busy: float  # the same as a fraction of all its CPUs' time
    threads: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def other(self) -> float:
        """CPU seconds of everything else: other processes, kernel threads (writeback)."""
        return self.busy_cpu - self.cpu - self.clients - self.upstream


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class UsageMeter:
    """Snapshot now; ``stop`` returns the ``Usage`` since."""

    def __init__(self, pids: list[int], loop_pid: int | None = None,
                 upstream_pids: list[int] | None = None) -> None:
        self._pids, self._loop, self._up = pids, loop_pid, upstream_pids or []
        self._t = time.perf_counter()
        self._cpu = cpu_seconds(pids)
        self._up_cpu = cpu_seconds(self._up)
        self._clients = _children_cpu()
        self._busy, self._total = machine_cpu()
        self._threads = threads_schedstat(loop_pid) if loop_pid else {}
        if loop_pid and loop_pid not in self._threads:
            raise RuntimeError(f"no schedstat for imgcache's event loop (pid {loop_pid})")

    def stop(self) -> Usage:
        """Usage since the snapshot."""
        busy, total = machine_cpu()
        return Usage(seconds=time.perf_counter() - self._t,
                     cpu=cpu_seconds(self._pids) - self._cpu,
                     clients=_children_cpu() - self._clients,
                     upstream=cpu_seconds(self._up) - self._up_cpu,
                     busy_cpu=busy - self._busy,
                     busy=(busy - self._busy) / max(total - self._total, 1e-9),
                     threads=self._threads_since())

    def _threads_since(self) -> dict[str, tuple[float, float]]:
        """On a CPU and waiting since the snapshot, summed by role: the loop (the main
        thread), then by the name the thread shows now (a thread started meanwhile counts
        from zero)."""
        if not self._loop:
            return {}
        now = threads_schedstat(self._loop)
        if self._loop not in now:
            raise RuntimeError(f"no schedstat for imgcache's event loop (pid {self._loop})")
        roles = {role: [0.0, 0.0] for role in THREAD_ROLES}
        for tid, (name, run, wait) in now.items():
            role = "loop" if tid == self._loop else _ROLE_OF_NAME.get(name)
            if role is not None:
                _, run_before, wait_before = self._threads.get(tid, (name, 0.0, 0.0))
                roles[role][0] += run - run_before
                roles[role][1] += wait - wait_before
        return {role: (run, wait) for role, (run, wait) in roles.items()}


def record_usage(results: Results, key: str, name: str, usage: Usage,
                 per_gb: float | None = None) -> None:
    """Add ``usage`` to the series ``key``.cpu_s (or .cpu_s_per_gb when ``per_gb`` bytes
    are given), .busy_pct and, for imgcache, ROLE_run_s and ROLE_wait_s for each of
    THREAD_ROLES."""
    if name != DIRECT:
        if per_gb:
            results.add(f"{key}.cpu_s_per_gb", name, usage.cpu / (per_gb / 1e9))
        else:
            results.add(f"{key}.cpu_s", name, usage.cpu)
    results.add(f"{key}.clients_cpu_s", name, usage.clients)
    results.add(f"{key}.upstream_cpu_s", name, usage.upstream)
    results.add(f"{key}.other_cpu_s", name, usage.other)
    results.add(f"{key}.busy_cpu_s", name, usage.busy_cpu)
    results.add(f"{key}.busy_pct", name, 100 * usage.busy)
    if name == IMGCACHE:
        for role, (run, wait) in usage.threads.items():
            results.add(f"{key}.{role}_run_s", name, run)
            results.add(f"{key}.{role}_wait_s", name, wait)


# --- scenario 1: hit throughput ---------------------------------------------------------

def prime(bench: PeerBench, contender: Contender, upstream: str, route: Route) -> None:
    """Get ``route`` into the contender's cache (one GET, the fill awaited), then check
    that the next GET is a HIT."""
    if not contender.is_cache:
        return
    url = data_url(contender.urls[upstream], route.image_id)
    size = route.image.size
    imgcache = bench.imgcaches[upstream] if contender.kind == IMGCACHE else None
    before = imgcache.committed_fills() if imgcache else 0
    check_download(bench.checks, f"{contender.name}: priming GET complete",
                   download(bench.procs, url), size)
    if imgcache:
        imgcache.wait_committed(before + 1)
    check_download(bench.checks, f"{contender.name}: second GET is a HIT",
                   download(bench.procs, url), size, "HIT")


def measure_hits(bench: PeerBench, names: list[str], route: Route, reps: int,
                 clients: int, singles: int = 3) -> None:
    """Scenario 1: the cached image downloaded by 1 client (``singles`` downloads per
    contender and repetition: one download is short and noisy), then by ``clients`` at
    once."""
    size = route.image.size
    for name in names:
        prime(bench, bench.contenders[name], "glance", route)
    settle()
    for rep in range(reps):
        for name in [n for k in range(singles) for n in rotated(names, rep + k)]:
            got = download(bench.procs, _url(bench, name, "glance", route))
            check_download(bench.checks, f"hit, 1 client: {name} complete", got, size,
                           _hit_status(bench, name))
            bench.results.add("hit1.mbps", name, got.mb_per_s)
        progress(f"hit 1 client rep {rep + 1}/{reps}: " + _line(bench, "hit1.mbps", names))
    for rep in range(reps):
        for name in rotated(names, rep):
            batch = run_batch(bench.procs, _url(bench, name, "glance", route),
                              ["/dev/null"] * clients)
            check_batch(bench.checks, f"hit, {clients} clients: {name} complete", batch,
                        size, _hit_status(bench, name))
            bench.results.add("hitN.mbps", name, batch.aggregate_mb_per_s)
        progress(f"hit {clients} clients rep {rep + 1}/{reps}: "
                 + _line(bench, "hitN.mbps", names))


def _url(bench: PeerBench, name: str, upstream: str, route: Route) -> str:
    return data_url(bench.contenders[name].urls[upstream], route.image_id)


def _hit_status(bench: PeerBench, name: str) -> str | None:
    return "HIT" if bench.contenders[name].is_cache else None


def _line(bench: PeerBench, metric: str, names: list[str], fmt: str = ".0f") -> str:
    return ", ".join(f"{n} {bench.results.get(metric, n)[-1]:{fmt}}" for n in names
                     if bench.results.get(metric, n))


# --- scenario 6: many small hits -------------------------------------------------------

def measure_small(bench: PeerBench, names: list[str], route: Route, reps: int,
                  connections: int, seconds: float) -> None:
    """Scenario 6: requests per second for a small cached image over ``connections``
    keep-alive connections (wrk)."""
    for name in names:
        prime(bench, bench.contenders[name], "glance", route)
    size = route.image.size
    for rep in range(reps):
        for name in rotated(names, rep):
            got = run_wrk(bench.procs, bench.wrk, _url(bench, name, "glance", route),
                          connections, seconds)
            ok = (got.bad_status == 0 and got.socket_errors == 0 and got.requests > 0
                  and got.bytes_read >= got.requests * size * 0.99)
            bench.checks.expect(f"small hits: {name}, every response whole and 200", ok,
                                f"{got}")
            bench.results.add("small.rps", name, got.rps)
            bench.results.add("small.p99_ms", name, got.p99 * 1e3)
        progress(f"small hits rep {rep + 1}/{reps}: " + _line(bench, "small.rps", names))


# --- scenario 2: cold boot storm ---------------------------------------------------------

@dataclass
class StormRep:
    """One storm: its clients' figures and what the upstream and the contender did."""

    batch: Batch
    upstream_requests: int
    upstream_bytes: int  # -1 when the upstream does not log bytes
    metadata_gets: int
    verified: int
    checked: int
    usage: Usage
    peak_rss: int = 0  # imgcache only
    written: int = 0  # bytes written to disk by the contender's processes during the storm
    mapped_share: float | None = None  # imgcache only: its readers' bytes from mappings


def storm(bench: PeerBench, name: str, upstream: str, route: Route, clients: int,
          verify: int) -> StormRep:
    """``clients`` curls started at once through ``name`` for ``route`` (uncached unless
    the contender is the upstream itself); ``verify`` of them (the first and the last
    started) save their bodies to tmpfs for a sha512 check, the same number for every
    contender since writing a body costs its client CPU. Waits until the contender's
    fill is over (committed, for imgcache)."""
    contender = bench.contenders[name]
    up = bench.upstreams[upstream]
    imgcache = bench.imgcaches[upstream] if contender.kind == IMGCACHE else None
    settle()
    logged_before = len(up.data_requests(route.image_id))
    meta_before = up.metadata_gets(route.image_id)
    pids = [_pid(imgcache)] if imgcache else contender.pids()
    written_before = write_bytes(pids)
    committed_before = 0
    sent_before: dict[str, float] = {}
    if imgcache:
        committed_before = imgcache.committed_fills()
        reset_peak_rss(_pid(imgcache))
        sent_before = _reader_bytes(imgcache)
    saved = verified_indices(clients, verify)
    outputs = [str(bench.scratch / f"body-{i}") if i in saved else "/dev/null"
               for i in range(clients)]
    meter = UsageMeter(pids, pids[0] if imgcache else None, up.pids())
    batch = run_batch(bench.procs, data_url(contender.urls[upstream], route.image_id),
                      outputs)
    usage = meter.stop()
    rss, mapped_share = 0, None
    if imgcache:
        sent = {how: count - sent_before.get(how, 0.0)
                for how, count in _reader_bytes(imgcache).items()}
        total = sum(sent.values())
        mapped_share = sent.get(MAPPED, 0.0) / total if total else None
        committed, _ = imgcache.wait_committed(committed_before + 1)
        bench.checks.expect(f"storm ({up.label}): imgcache committed one fill",
                            committed == committed_before + 1,
                            f"{committed - committed_before} committed")
        rss = peak_rss(_pid(imgcache))
    logged = wait_logged(lambda: up.data_requests(route.image_id))[logged_before:]
    verified = verify_bodies([Path(outputs[i]) for i in sorted(saved)], route.image.sha512)
    if imgcache:
        settle()  # (the commit's fdatasync already flushed the fill)
    written = write_bytes(pids) - written_before
    if imgcache:
        imgcache.evict(route.image_id)
    rep = StormRep(batch=batch, usage=usage, upstream_requests=len(logged),
                   upstream_bytes=sum(logged) if all(b >= 0 for b in logged) else -1,
                   metadata_gets=up.metadata_gets(route.image_id) - meta_before,
                   verified=verified, checked=len(saved), peak_rss=rss, written=written,
                   mapped_share=mapped_share)
    _check_storm(bench.checks, name, up.label, rep, route.image.size, clients)
    return rep


def _reader_bytes(imgcache: Imgcache) -> dict[str, float]:
    """Bytes imgcache has sent to the readers of downloads in flight, by how they went
    (imgcache_fill_reader_bytes_total's ``how``: mapped, unfinished, no_room, map_failed)."""
    prefix = 'imgcache_fill_reader_bytes_total{how="'
    return {name[len(prefix):-2]: value for name, value in imgcache.metrics().items()
            if name.startswith(prefix)}


def _pid(imgcache: Imgcache) -> int:
    pid = imgcache.pid()
    if pid is None:
        raise RuntimeError("imgcache is not running")
    return pid


def _check_storm(checks: Checks, name: str, label: str, rep: StormRep, size: int,
                 clients: int) -> None:
    check_batch(checks, f"storm ({label}): {name}, every client got the whole image",
                rep.batch, size)
    if rep.checked:
        checks.expect(f"storm ({label}): {name}, checked bodies match sha512",
                      rep.verified == rep.checked, f"{rep.verified} of {rep.checked} matched")
    if name == IMGCACHE:
        checks.expect(f"storm ({label}): imgcache, exactly one upstream data GET",
                      rep.upstream_requests == 1, f"{rep.upstream_requests} GETs")
        statuses = Counter(d.cache_status for d in rep.batch.downloads)
        checks.expect(f"storm ({label}): imgcache, one MISS, the rest COALESCED or HIT",
                      statuses["MISS"] == 1
                      and statuses["MISS"] + statuses["COALESCED"] + statuses["HIT"]
                      == clients, str(dict(statuses)))


def record_ttfbs(results: Results, key: str, name: str, batch: Batch) -> None:
    """Add the clients' times to first byte of ``batch`` to the series ``key``.ttfb_*: the
    first client started, p50, p99, p99 minus the first, and the largest."""
    ttfbs = [d.ttfb for d in batch.downloads]
    results.add(f"{key}.ttfb_first", name, ttfbs[0])
    results.add(f"{key}.ttfb_p50", name, percentile(ttfbs, 50))
    results.add(f"{key}.ttfb_p99", name, percentile(ttfbs, 99))
    results.add(f"{key}.ttfb_spread", name, percentile(ttfbs, 99) - ttfbs[0])
    results.add(f"{key}.ttfb_max", name, max(ttfbs))


def record_storm(results: Results, key: str, name: str, rep: StormRep) -> None:
    """Add one storm's figures to the series ``key``.*."""
    results.add(f"{key}.wall", name, rep.batch.wall)
    record_ttfbs(results, key, name, rep.batch)
    results.add(f"{key}.requests", name, rep.upstream_requests)
    if rep.upstream_bytes >= 0:
        results.add(f"{key}.upstream_mb", name, rep.upstream_bytes / 1e6)
    if name == IMGCACHE:
        results.add(f"{key}.metadata_gets", name, rep.metadata_gets)
        results.add(f"{key}.rss_mib", name, rep.peak_rss / (1 << 20))
        if rep.mapped_share is not None:
            results.add(f"{key}.mapped_pct", name, 100 * rep.mapped_share)
    size = rep.batch.downloads[0].size
    if name != DIRECT and size:
        results.add(f"{key}.written_per_fill", name, rep.written / size)
    record_usage(results, key, name, rep.usage)


def _storm_progress(bench: PeerBench, key: str, name: str, rep: StormRep) -> None:
    ttfbs = [d.ttfb for d in rep.batch.downloads]
    statuses = dict(sorted(Counter(d.cache_status or "-" for d in rep.batch.downloads)
                           .items()))
    progress(f"  {key} {name}: wall {rep.batch.wall:.2f} s, ttfb first/p50/p99 "
             f"{ttfbs[0]:.3f}/{percentile(ttfbs, 50):.3f}/{percentile(ttfbs, 99):.3f} s, "
             f"upstream {rep.upstream_requests} GETs {max(rep.upstream_bytes, 0) / 1e6:.0f} MB, "
             f"{statuses}" + (f", peak RSS {rep.peak_rss / (1 << 20):.0f} MiB"
                              if rep.peak_rss else ""))


def direct_one(bench: PeerBench, upstream: str, route: Route) -> Download:
    """One download straight from the upstream (no cache)."""
    settle()
    got = download(bench.procs, data_url(bench.contenders[DIRECT].urls[upstream],
                                         route.image_id))
    check_download(bench.checks, f"direct, 1 client ({bench.upstreams[upstream].label}): "
                   "complete", got, route.image.size)
    return got


def fanout(bench: PeerBench, route: Route, clients: int) -> Batch:
    """nginx serving the already-local file to ``clients`` at once: the fastest this
    machine delivers that many copies (no cache can beat it)."""
    settle()
    batch = run_batch(bench.procs, data_url(bench.standin.local_url, route.image_id),
                      ["/dev/null"] * clients)
    check_batch(bench.checks, f"fan-out bound: nginx local file to {clients} clients, "
                "complete", batch, route.image.size)
    return batch


def measure_storms(bench: PeerBench, names: list[str], image_key: str, links: list[str],
                   reps: int, clients: int, verify: int, slow_direct_seconds: float) -> None:
    """Scenario 2 (and 4's RSS during it): per repetition and link, a storm of
    ``clients`` through each contender on a fresh id, a storm straight from the upstream,
    one direct download at the link's speed, and (once per repetition) nginx fanning the
    local file out to as many clients. A direct storm expected to take longer than
    ``slow_direct_seconds`` (clients x size / bandwidth: minutes over 1 Gbit/s) is not
    run; that expectation is recorded as its computed wall time instead."""
    res = bench.results
    fixed = bench.routes.fixed[image_key]
    size = fixed.image.size
    for rep in range(reps):
        progress(f"storm rep {rep + 1}/{reps}")
        fan = fanout(bench, fixed, clients)
        res.add("storm.fanout.wall", BOUND, fan.wall)
        record_ttfbs(res, "storm.fanout", BOUND, fan)
        for link in links:
            up = bench.upstreams[link]
            key = f"storm.{link}"
            for name in rotated(names, rep):
                route = fixed if name == DIRECT else bench.routes.fresh(image_key)
                expected = clients * size * 8 / up.bits if up.bits else 0.0
                if name == DIRECT and expected > slow_direct_seconds:
                    if rep == 0:
                        res.add(f"{key}.wall_computed", DIRECT, expected)
                    continue
                got = storm(bench, name, link, route, clients,
                            verify)
                record_storm(res, key, name, got)
                _storm_progress(bench, key, name, got)
            one = direct_one(bench, link, fixed)
            res.add(f"{key}.direct1_wall", BOUND, one.total)
            # Scenario 3 over the link: one client's verified cold miss against one direct
            # download at the same speed.
            cold = imgcache_cold(bench, bench.routes.fresh(image_key), f"{link} link", link)
            res.add(f"{key}.cold_mbps", IMGCACHE, cold.got.mb_per_s)
            res.add(f"{key}.cold_mbps", DIRECT, one.mb_per_s)
            progress(f"  {key} bound: one direct download {one.total:.2f} s, nginx local "
                     f"file to {clients} clients {fan.wall:.2f} s; one cold miss through "
                     f"imgcache {cold.got.mb_per_s:.0f} MB/s, direct {one.mb_per_s:.0f} MB/s")


# --- scenario 3 (and 4, 5): single-client cold miss ----------------------------------------

@dataclass(frozen=True)
class ColdRep:
    """One client's cold miss: the download, what it cost, what imgcache kept."""

    got: Download
    usage: Usage
    written: int  # bytes the contender's processes wrote to disk
    peak_rss: int = 0  # imgcache only


def imgcache_cold(bench: PeerBench, route: Route, label: str,
                  upstream: str = "glance") -> ColdRep:
    """One client asking imgcache (the one in front of ``upstream``) for an image it has
    never seen. Returns the download, the CPU used meanwhile, imgcache's peak RSS during it
    and the bytes it wrote to disk for the fill (counted until the fill committed,
    fdatasync included); the entry is evicted after."""
    imgcache = bench.imgcaches[upstream]
    pid = _pid(imgcache)
    settle()
    before = imgcache.committed_fills()
    written_before = write_bytes([pid])
    reset_peak_rss(pid)
    meter = UsageMeter([pid], pid, bench.upstreams[upstream].pids())
    got = download(bench.procs, data_url(imgcache.url, route.image_id))
    usage = meter.stop()
    check_download(bench.checks, f"cold, 1 client, {label}: imgcache, a complete MISS", got,
                   route.image.size, "MISS")
    committed, _ = imgcache.wait_committed(before + 1, timeout=600)
    bench.checks.expect(f"cold, 1 client, {label}: imgcache committed one fill",
                        committed == before + 1, f"{committed - before} committed")
    rss = peak_rss(pid)
    settle()
    written = write_bytes([pid]) - written_before
    imgcache.evict(route.image_id)
    return ColdRep(got, usage, written, rss)


def imgcache_cold_at_cap(bench: PeerBench, image_key: str) -> ColdRep:
    """A cold miss as a full cache makes it: right after an image of the same size left the
    cache (one fill, then its eviction, then the measured fill on another fresh id).

    Why apart from the alternating cold misses: on a virtual machine that hands the memory
    its guest frees back to the host (free page reporting), a write into page cache costs
    several times more CPU when its pages come from memory the host took back than from
    memory the guest freed a moment ago. Alternating with the peers, imgcache's fill mostly
    lands on taken-back memory (seconds of other contenders' work go before it, except when
    the rotation puts it right after a fill freed memory); a cache at its cap evicts an
    image just before it fills the next one, and a host without page reporting never takes
    memory back."""
    imgcache_cold(bench, bench.routes.fresh(image_key), "before a fill at the cap")
    return imgcache_cold(bench, bench.routes.fresh(image_key), "at the cap")


def peer_cold(bench: PeerBench, name: str, route: Route) -> ColdRep:
    """One client asking a peer cache for an image it has never seen (or one direct
    download); returns it, the CPU used and the bytes the contender's processes wrote
    meanwhile (counted when dirtied, so no sync is needed to see them)."""
    contender = bench.contenders[name]
    settle()
    pids = contender.pids()
    before = write_bytes(pids)
    meter = UsageMeter(pids, None, bench.upstreams["glance"].pids())
    got = download(bench.procs, data_url(contender.urls["glance"], route.image_id))
    usage = meter.stop()
    check_download(bench.checks, f"cold, 1 client: {name} complete", got, route.image.size)
    return ColdRep(got, usage, write_bytes(pids) - before)


def hash_rate(path: Path) -> float:
    """MB/s of sha512 over ``path`` (in the page cache) on one core, in a subprocess."""
    code = ("import hashlib, sys, time\n"
            "with open(sys.argv[1], 'rb') as f:\n"
            "    while f.read(8 << 20): pass\n"  # into the page cache first
            "    f.seek(0); t = time.perf_counter()\n"
            "    digest = hashlib.file_digest(f, 'sha512')\n"
            "    print(f.tell() / (time.perf_counter() - t) / 1e6)\n")
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                          text=True, check=True)
    return float(done.stdout)


def disk_write_rate(directory: Path, size: int) -> float:
    """MB/s of ``dd bs=1M conv=fdatasync`` writing ``size`` bytes into ``directory``."""
    target = directory / "dd-bound.bin"
    settle()
    started = time.perf_counter()
    try:
        subprocess.run(["dd", "if=/dev/zero", f"of={target}", "bs=1M",
                        f"count={max(1, size >> 20)}", "conv=fdatasync", "status=none"],
                       check=True)
        return (size >> 20 << 20) / (time.perf_counter() - started) / 1e6
    finally:
        target.unlink(missing_ok=True)


def measure_cold(bench: PeerBench, names: list[str], image_key: str, reps: int,
                 dd_dir: Path) -> None:
    """Scenario 3: one client, one uncached image, through each contender (imgcache
    verifies sha512 before the last bytes go out; the peers check nothing), then imgcache
    once more at the cap (``imgcache_cold_at_cap``), with the bounds measured in the same
    repetition: sha512 on one core, disk writes with fdatasync. Also scenario 4's 1 GiB
    peak RSS and scenario 5's bytes written per fill."""
    res = bench.results
    fixed = bench.routes.fixed[image_key]
    size = fixed.image.size
    for rep in range(reps):
        for name in rotated(names, rep):
            if name == IMGCACHE:
                cold = imgcache_cold(bench, bench.routes.fresh(image_key), "cold image")
                res.add("cold.rss_mib", name, cold.peak_rss / (1 << 20))
            else:
                route = fixed if name == DIRECT else bench.routes.fresh(image_key)
                cold = peer_cold(bench, name, route)
            res.add("cold.mbps", name, cold.got.mb_per_s)
            record_usage(res, "cold", name, cold.usage, per_gb=size)
            if name != DIRECT:
                res.add("cold.written_per_fill", name, cold.written / size)
        res.add("cold.sha512_mbps", BOUND, hash_rate(fixed.image.path))
        res.add("cold.disk_mbps", BOUND, disk_write_rate(dd_dir, min(size, 512 << 20)))
        line = (f"cold 1 client rep {rep + 1}/{reps}: " + _line(bench, "cold.mbps", names)
                + f"; sha512 {res.get('cold.sha512_mbps', BOUND)[-1]:.0f} MB/s, disk "
                f"{res.get('cold.disk_mbps', BOUND)[-1]:.0f} MB/s")
        if IMGCACHE in names:
            at_cap = imgcache_cold_at_cap(bench, image_key)
            res.add("cold_at_cap.mbps", IMGCACHE, at_cap.got.mb_per_s)
            record_usage(res, "cold_at_cap", IMGCACHE, at_cap.usage, per_gb=size)
            line += (f"; imgcache wrote {res.get('cold.written_per_fill', IMGCACHE)[-1]:.3f}x "
                     f"the image, at the cap {at_cap.got.mb_per_s:.0f} MB/s")
        progress(line)


def measure_big(bench: PeerBench, image_key: str, reps: int) -> None:
    """Scenario 4: imgcache's peak RSS while one client fills a big image (compared with
    the cold image of scenario 3), and scenario 5's bytes written per fill for it."""
    res = bench.results
    size = bench.routes.fixed[image_key].image.size
    for rep in range(reps):
        cold = imgcache_cold(bench, bench.routes.fresh(image_key), "big image")
        res.add("big.rss_mib", IMGCACHE, cold.peak_rss / (1 << 20))
        res.add("big.written_per_fill", IMGCACHE, cold.written / size)
        res.add("big.mbps", IMGCACHE, cold.got.mb_per_s)
        progress(f"big image rep {rep + 1}/{reps}: {cold.got.mb_per_s:.0f} MB/s, peak RSS "
                 f"{cold.peak_rss / (1 << 20):.0f} MiB, wrote {cold.written / size:.3f}x "
                 "the image")


# --- the real glance-api ------------------------------------------------------------------

def measure_real(bench: PeerBench, names: list[str], fresh: Iterator[Route], fixed: Route,
                 reps: int, clients: int, verify: int) -> None:
    """A cold storm against a real glance-api 33 (gunicorn, file store): every contender
    on an image of its own, uploaded for it; the direct storm on one more."""
    for rep in range(reps):
        for name in rotated(names, rep):
            route = fixed if name == DIRECT else next(fresh)
            got = storm(bench, name, "real", route, clients,
                        verify)
            record_storm(bench.results, "real", name, got)
            _storm_progress(bench, "real", name, got)
