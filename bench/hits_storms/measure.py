"""The measurements: cache-hit throughput against nginx serving the same file, and cold
fills (a 16-client boot storm, a lone MISS) against direct downloads from the upstream.
Each records its raw samples; ``report`` turns them into medians and ratios.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common.checks import Checks, check_batch, check_download, verified_indices, verify_bodies
from bench.common.curls import Batch, Download, data_url, download, run_batch
from bench.common.glance_nginx import Nginx, Route
from bench.common.imgcache_server import Imgcache
from bench.common.lifecycle import progress, settle
from bench.common.procs import Processes

IMGCACHE = "imgcache"
NGINX = "nginx"


@dataclass
class Bench:
    """What the measurements run against."""

    procs: Processes
    nginx: Nginx
    imgcache: Imgcache
    scratch: Path  # bodies whose hash is checked land here (tmpfs when there is room)
    checks: Checks


@dataclass
class HitResults:
    """Cache-hit samples: MB/s of single downloads, wall seconds of concurrent rounds."""

    size: int
    clients: int
    single_mbps: dict[str, list[float]] = field(
        default_factory=lambda: {IMGCACHE: [], NGINX: []})
    concurrent_wall: dict[str, list[float]] = field(
        default_factory=lambda: {IMGCACHE: [], NGINX: []})


@dataclass
class ColdRep:
    """One repetition of the cold measurements, each on an image id imgcache has not seen,
    with the direct downloads from the Glance stand-in they are compared with."""

    storm_wall: float  # seconds until all storm clients finished
    ttfbs: list[float]  # each storm client's time to first byte
    upstream_gets: int  # data GETs that reached the stand-in for the storm's id
    committed: int  # fills committed by imgcache for the storm (must be 1)
    commit_lag: float  # seconds from the storm's end until its fill had committed
    cache_statuses: Counter[str]
    verified: int  # storm bodies whose sha512 matched
    miss_total: float  # one lone client's cold MISS, seconds
    direct_1: float  # one direct download, seconds
    direct_n_wall: float  # as many direct downloads as storm clients, at once: wall seconds


@dataclass
class ColdResults:
    """All repetitions of the cold measurements."""

    size: int
    clients: int
    reps: list[ColdRep] = field(default_factory=list)


def prime_hit(bench: Bench, route: Route) -> None:
    """Fill imgcache with the hit image (one MISS, then one HIT) and warm nginx's copy."""
    size = route.image.size
    url = data_url(bench.imgcache.url, route.image_id)
    committed_before = bench.imgcache.committed_fills()
    check_download(bench.checks, "hit image: first GET is a MISS",
                   download(bench.procs, url), size, "MISS")
    committed, _ = bench.imgcache.wait_committed(committed_before + 1)
    bench.checks.expect("hit image: fill committed", committed == committed_before + 1,
                        f"{committed - committed_before} committed")
    check_download(bench.checks, "hit image: second GET is a HIT",
                   download(bench.procs, url), size, "HIT")
    gets = wait_for_gets(bench.nginx, route.image_id)
    bench.checks.expect("hit image: one upstream data GET", gets == 1, f"{gets} GETs")
    check_download(bench.checks, "nginx baseline: warm-up GET",
                   download(bench.procs, data_url(bench.nginx.local_url, route.image_id)),
                   size)
    settle()


def _order(rep: int) -> list[str]:
    """Alternate who goes first, so neither side always follows the other."""
    return [IMGCACHE, NGINX] if rep % 2 == 0 else [NGINX, IMGCACHE]


def measure_hits(bench: Bench, route: Route, reps: int, clients: int) -> HitResults:
    """Single-client and ``clients``-concurrent downloads of the cached image, imgcache and
    nginx (same bytes, page cache, sendfile) alternating."""
    size = route.image.size
    urls = {IMGCACHE: data_url(bench.imgcache.url, route.image_id),
            NGINX: data_url(bench.nginx.local_url, route.image_id)}
    wanted = {IMGCACHE: "HIT", NGINX: None}
    results = HitResults(size=size, clients=clients)
    for rep in range(reps):
        for name in _order(rep):
            got = download(bench.procs, urls[name])
            check_download(bench.checks, f"hit 1 client: {name} complete", got, size,
                           wanted[name])
            results.single_mbps[name].append(got.mb_per_s)
        progress(f"hit 1 client rep {rep + 1}/{reps}: " + ", ".join(
            f"{n} {results.single_mbps[n][-1]:.0f} MB/s" for n in (IMGCACHE, NGINX)))
    for rep in range(reps):
        for name in _order(rep):
            batch = run_batch(bench.procs, urls[name], ["/dev/null"] * clients)
            check_batch(bench.checks, f"hit {clients} clients: {name} complete", batch, size,
                        wanted[name])
            results.concurrent_wall[name].append(batch.wall)
        progress(f"hit {clients} clients rep {rep + 1}/{reps}: " + ", ".join(
            f"{n} {results.concurrent_wall[n][-1]:.2f} s" for n in (IMGCACHE, NGINX)))
    return results


def wait_for_gets(nginx: Nginx, image_id: str, timeout: float = 5.0) -> int:
    """The upstream data GETs for ``image_id`` once nginx has logged them (it logs when a
    response ends, which may trail the client's last byte by a moment)."""
    deadline = time.monotonic() + timeout
    while nginx.data_gets(image_id) == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    return nginx.data_gets(image_id)


def direct_batch(bench: Bench, route: Route, clients: int) -> Batch:
    """``clients`` curls at once straight from the Glance stand-in (no imgcache)."""
    settle()
    batch = run_batch(bench.procs, data_url(bench.nginx.glance_url, route.image_id),
                      ["/dev/null"] * clients)
    check_batch(bench.checks, f"direct from nginx, {clients} at once: complete", batch,
                route.image.size)
    return batch


@dataclass
class _Storm:
    batch: Batch
    gets: int
    committed: int
    commit_lag: float
    verified: int


def storm_once(bench: Bench, route: Route, clients: int, verify: int) -> _Storm:
    """``clients`` curls at once for an image imgcache has never seen; ``verify`` of them
    (the first and last started) save their bodies for a sha512 check. Waits for the fill
    to commit before returning."""
    settle()
    committed_before = bench.imgcache.committed_fills()
    saved = verified_indices(clients, verify)
    outputs = [str(bench.scratch / f"body-{i}") if i in saved else "/dev/null"
               for i in range(clients)]
    batch = run_batch(bench.procs, data_url(bench.imgcache.url, route.image_id), outputs)
    committed, lag = bench.imgcache.wait_committed(committed_before + 1)
    gets = wait_for_gets(bench.nginx, route.image_id)
    verified = verify_bodies([Path(outputs[i]) for i in sorted(saved)], route.image.sha512)
    return _Storm(batch, gets, committed - committed_before, lag, verified)


def cold_miss(bench: Bench, route: Route) -> Download:
    """One lone client asking imgcache for an image it has never seen (a MISS); waits for
    the fill to commit before returning."""
    settle()
    committed_before = bench.imgcache.committed_fills()
    got = download(bench.procs, data_url(bench.imgcache.url, route.image_id))
    check_download(bench.checks, "cold, 1 client: a complete MISS", got, route.image.size,
                   "MISS")
    committed, _ = bench.imgcache.wait_committed(committed_before + 1)
    bench.checks.expect("cold, 1 client: one fill committed",
                        committed == committed_before + 1,
                        f"{committed - committed_before} committed")
    return got


def direct_one(bench: Bench, route: Route) -> Download:
    """One curl straight from the Glance stand-in (no imgcache)."""
    settle()
    got = download(bench.procs, data_url(bench.nginx.glance_url, route.image_id))
    check_download(bench.checks, "direct from nginx, 1 client: complete", got,
                   route.image.size)
    return got


def measure_cold(bench: Bench, storms: list[Route], singles: list[Route], direct: Route,
                 clients: int, verify: int) -> ColdResults:
    """Per repetition: a storm of ``clients`` on a fresh id, one lone cold MISS on another
    fresh id, and their baselines from the Glance stand-in (one download; ``clients``
    downloads at once); the order reverses every other repetition. All ids expose the same
    file, so every figure is about the same bytes."""
    results = ColdResults(size=direct.image.size, clients=clients)
    for rep, (storm_route, single_route) in enumerate(zip(storms, singles, strict=True)):
        steps: list[Callable[[], Any]] = [
            lambda: direct_one(bench, direct),
            lambda: direct_batch(bench, direct, clients),
            lambda r=storm_route: storm_once(bench, r, clients, verify),
            lambda r=single_route: cold_miss(bench, r),
        ]
        if rep % 2:
            steps.reverse()
        figures = [step() for step in steps]
        if rep % 2:
            figures.reverse()
        direct_1, direct_n, storm, miss = figures
        _check_storm(bench.checks, storm, results.size, min(verify, clients))
        results.reps.append(ColdRep(
            storm_wall=storm.batch.wall, ttfbs=[d.ttfb for d in storm.batch.downloads],
            upstream_gets=storm.gets, committed=storm.committed, commit_lag=storm.commit_lag,
            cache_statuses=Counter(d.cache_status or "-" for d in storm.batch.downloads),
            verified=storm.verified, miss_total=miss.total, direct_1=direct_1.total,
            direct_n_wall=direct_n.wall))
        _report_cold(results.reps[-1], rep, len(storms), clients)
    return results


def _report_cold(rep: ColdRep, index: int, reps: int, clients: int) -> None:
    progress(f"cold rep {index + 1}/{reps}: storm of {clients} {rep.storm_wall:.2f} s "
             f"(direct: 1 client {rep.direct_1:.2f} s, {clients} at once "
             f"{rep.direct_n_wall:.2f} s), lone MISS {rep.miss_total:.2f} s, upstream GETs "
             f"{rep.upstream_gets}, {dict(sorted(rep.cache_statuses.items()))}, "
             f"sha512 ok {rep.verified}, commit {rep.commit_lag:.2f} s after the storm")


def _check_storm(checks: Checks, storm: _Storm, size: int, verify: int) -> None:
    downloads = storm.batch.downloads
    check_batch(checks, "storm: every client got the whole image", storm.batch, size)
    checks.expect("storm: exactly one upstream data GET", storm.gets == 1,
                  f"{storm.gets} GETs")
    checks.expect("storm: one fill committed", storm.committed == 1,
                  f"{storm.committed} committed")
    checks.expect("storm: checked bodies match sha512", storm.verified == verify,
                  f"{storm.verified} of {verify} matched")
    misses = sum(1 for d in downloads if d.cache_status == "MISS")
    checks.expect("storm: one MISS, the rest COALESCED or HIT", misses == 1 and all(
        d.cache_status in ("MISS", "COALESCED", "HIT") for d in downloads),
        str(Counter(d.cache_status for d in downloads)))
