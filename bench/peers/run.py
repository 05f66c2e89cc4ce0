"""imgcache against the caches an operator would pick instead, side by side in one run:
``.venv/bin/python -m bench.peers.run [--quick]`` (also ``make bench SUITE=peers``; see
bench/README.md).

Sets up on 127.0.0.1: nginx as a fast Glance stand-in (full speed; and for the storms on
links held to 1 and 10 Gbit/s with tc and on one unshaped loopback link), a real glance-api
33, imgcache, nginx proxy_cache (lock on: its defaults, and lock timeout/age 1 h) and
Varnish (streaming); drives them all with curl processes (wrk for small requests); writes
bench/results/peers.md and peers.png.
Installs nginx, varnish and wrk from Debian when they are missing (root).
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from bench.common import lifecycle
from bench.common.checks import Checks
from bench.common.glance_nginx import ExtraGlance, Nginx, Route, find_or_install_nginx
from bench.common.images import TestImage, ensure_image, human_size, parse_size
from bench.common.imgcache_server import Imgcache
from bench.common.installs import ensure_matplotlib, find_or_install
from bench.common.lifecycle import progress
from bench.common.paths import REPO, RESULTS, WORK
from bench.common.procs import Processes, run_text
from bench.common.report_parts import machine_details
from bench.peers.caches import NGINX_VARIANTS, NginxCache, Varnish
from bench.peers.glance_api import RealGlanceUpstream
from bench.peers.measure import (
    DIRECT,
    IMGCACHE,
    NGINX,
    NGINX_1H,
    VARNISH,
    Contender,
    PeerBench,
    Results,
    Routes,
    Upstream,
    measure_big,
    measure_cold,
    measure_hits,
    measure_real,
    measure_small,
    measure_storms,
)
from bench.peers.report import Sizes, chart, render
from bench.peers.shaping import UNSHAPED, LinkShaper, tc_usable

SCENARIOS = ("hits", "small", "storm", "cold", "big", "real")
_LINK_UNITS = {"g": 10**9, "m": 10**6}


def parse_link(text: str) -> tuple[str, int | None]:
    """``1g`` -> ("1g", 10^9 bits/s); ``500m`` -> ("500m", 5 x 10^8); ``lo`` -> ("lo",
    None), unshaped loopback."""
    text = text.strip().lower().removesuffix("bit").removesuffix("bps")
    if text == UNSHAPED:
        return text, None
    if not text or text[-1] not in _LINK_UNITS or not text[:-1].replace(".", "").isdigit():
        raise argparse.ArgumentTypeError(f"not a link speed: {text!r} (e.g. 1g, 10g, 500m, "
                                         f"{UNSHAPED})")
    return text, int(float(text[:-1]) * _LINK_UNITS[text[-1]])


def link_label(name: str) -> str:
    """``1g`` -> ``1 Gbit/s``; ``lo`` -> ``unshaped loopback``."""
    if name == UNSHAPED:
        return "unshaped loopback"
    return f"{name[:-1]} {name[-1].upper()}bit/s"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Options; --quick lowers the defaults (3 repetitions, smaller images)."""
    parser = lifecycle.argument_parser(__spec__.name, __doc__)
    parser.add_argument("--quick", action="store_true",
                        help="3 repetitions, smaller images and shorter runs (unless given)")
    parser.add_argument("--reps", type=int, help="repetitions per measurement (5; quick 3)")
    parser.add_argument("--hit-size", type=parse_size,
                        help="image of hits and the lone cold miss (1G; quick 256M)")
    parser.add_argument("--storm-size", type=parse_size, help="storm image (512M; quick 128M)")
    parser.add_argument("--big-size", type=parse_size,
                        help="big image of the RSS comparison (4G; quick 1G)")
    parser.add_argument("--small-size", type=parse_size, default=parse_size("1M"),
                        help="image of the many-small-hits run (1M)")
    parser.add_argument("--real-size", type=parse_size,
                        help="image of the real glance-api storm (128M; quick 64M)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent hit clients (8)")
    parser.add_argument("--storm-clients", type=int, default=32, help="clients per storm (32)")
    parser.add_argument("--small-clients", type=int, default=64,
                        help="wrk connections for small hits (64)")
    parser.add_argument("--small-seconds", type=float, help="wrk duration (3; quick 2)")
    parser.add_argument("--links", type=lambda t: [parse_link(x) for x in t.split(",")],
                        default=[parse_link(x) for x in ("1g", "10g", UNSHAPED)],
                        help="upstream links of the storms: speeds, or lo for one with no "
                        "shaping (1g,10g,lo)")
    parser.add_argument("--verify", type=int, default=2,
                        help="storm clients per contender whose body is saved to tmpfs and "
                        "sha512-checked, the same for every contender (2)")
    parser.add_argument("--slow-direct", type=float, default=60.0,
                        help="a direct (no cache) storm expected to take longer than this "
                        "many seconds (clients x size / link) is not run, its wall time "
                        "is computed (60: the 1 Gbit/s one, 137 s, is computed)")
    parser.add_argument("--varnish-storage", choices=("file", "malloc"), default="file",
                        help="Varnish storage backend (file, in the run dir)")
    parser.add_argument("--only", type=lambda t: t.split(","),
                        help=f"comma-separated scenarios to run ({','.join(SCENARIOS)})")
    parser.add_argument("--output-dir", type=Path, default=RESULTS,
                        help="where peers.md and peers.png go (bench/results)")
    parser.add_argument("--keep-work", action="store_true",
                        help="keep the run's work dir (logs, configs) for debugging")
    args = parser.parse_args(argv)
    quick = args.quick
    args.reps = args.reps or (3 if quick else 5)
    args.hit_size = args.hit_size or parse_size("256M" if quick else "1G")
    args.storm_size = args.storm_size or parse_size("128M" if quick else "512M")
    args.big_size = args.big_size or parse_size("1G" if quick else "4G")
    args.real_size = args.real_size or parse_size("64M" if quick else "128M")
    args.small_seconds = args.small_seconds or (2.0 if quick else 3.0)
    args.only = args.only or list(SCENARIOS)
    unknown = set(args.only) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(sorted(unknown))}; "
                     f"choose from {', '.join(SCENARIOS)}")
    if min(args.reps, args.clients, args.storm_clients, args.small_clients) < 1:
        parser.error("--reps and the client counts must be >= 1")
    return args


def _program_version(cmd: list[str]) -> str:
    return (run_text(cmd) or "?").splitlines()[0]


def plan(args: argparse.Namespace) -> tuple[Routes, dict[str, TestImage]]:
    """The images and the stand-in's routes: fixed ids, and a fresh id per cold fill."""
    images_dir = WORK / "images"
    wanted = {"hit": args.hit_size, "small": args.small_size}
    if "storm" in args.only:
        wanted["storm"] = args.storm_size
    if "big" in args.only:
        wanted["big"] = args.big_size
    if "real" in args.only:
        wanted["real"] = args.real_size
    progress("images: " + ", ".join(f"{k} {human_size(v)}" for k, v in wanted.items())
             + f" (generated once, kept in {images_dir})")
    images = {key: ensure_image(size, images_dir) for key, size in wanted.items()}
    routes = Routes()
    caches = 4  # imgcache, nginx, nginx-1h, varnish
    # cold, per repetition: imgcache, nginx and Varnish once each, and imgcache's two fills
    # at the cap (direct downloads use the fixed id)
    fresh = {"hit": 5 * args.reps, "small": 0,
             "storm": (caches + 1) * len(args.links) * args.reps, "big": args.reps}
    for key, image in images.items():
        if key != "real":
            routes.add(key, image, fresh[key], lambda: str(uuid.uuid4()))
    return routes, images


def disk_need(args: argparse.Namespace, images: dict[str, TestImage]) -> int:
    """Bytes the run's caches need at most under bench/work (images excluded)."""
    imgcache = args.hit_size + args.small_size + max(args.hit_size, args.big_size)
    imgcache += 2 * args.storm_size * len(args.links) + 2 * args.real_size
    peers = 3 * peer_cache_size(args)
    glance = args.real_size * (4 * args.reps + 1) if "real" in images else 0
    return imgcache + peers + glance + (1 << 30)


def peer_cache_size(args: argparse.Namespace) -> int:
    """Cap of each peer cache (nginx zone, Varnish storage): room for the hit image and a
    few cold ones; older entries are evicted as they would be in service."""
    return args.hit_size + args.small_size + 4 * max(args.storm_size, args.hit_size,
                                                     args.real_size)


def run(args: argparse.Namespace) -> int:
    """Set up, measure, report; returns the exit status (1 when a check failed)."""
    nginx_binary = find_or_install_nginx()
    varnishd = find_or_install("varnishd", "varnish")
    wrk = find_or_install("wrk", "wrk")
    lifecycle.check_curl()
    matplotlib_version = ensure_matplotlib()
    lifecycle.sweep_stale_runs()
    marker = WORK / "tc-owner"
    use_tc, why_not = tc_usable(marker)
    routes, images = plan(args)
    lifecycle.check_disk(disk_need(args, images))
    checks, procs, results = Checks(), Processes(), Results()
    links = dict(args.links)
    shaped = {name: bits for name, bits in links.items() if bits}
    stoppers: list[Callable[[], None]] = []
    with contextlib.ExitStack() as stack:
        run_dir, scratch = lifecycle.enter_run(stack, args.keep_work,
                                               2 * max(args.storm_size, args.real_size))
        stack.callback(procs.close)
        stack.callback(lambda: [stop() for stop in reversed(stoppers)])
        stack.callback(lifecycle.ignore_interrupts)

        standin = Nginx(nginx_binary, run_dir / "standin", routes.all(),
                        [routes.fixed[k] for k in ("hit", "storm") if k in routes.fixed],
                        procs, [ExtraGlance(name, None if use_tc or not bits else bits // 8)
                                for name, bits in links.items()])
        standin.start()
        if shaped and use_tc:
            shaper = LinkShaper(marker)
            stoppers.append(shaper.stop)
            shaper.start({standin.ports[name]: bits for name, bits in shaped.items()})
        elif shaped:
            results.notes.append(f"links held with nginx limit_rate per connection, not tc "
                                 f"({why_not}): every upstream connection gets a link of "
                                 "its own, which favours caches that download an image "
                                 "several times")
        upstream_urls = {"glance": standin.glance_url,
                         **{name: standin.url(name) for name in links}}
        upstreams = {"glance": Upstream("glance", "stand-in, full speed",
                                        lambda i: standin.data_requests(i, "glance"),
                                        lambda i: standin.metadata_gets(i, "glance"),
                                        pids=standin.pids)}
        for name, bits in links.items():
            upstreams[name] = Upstream(
                name, f"{link_label(name)} link",
                lambda i, n=name: standin.data_requests(i, n),
                lambda i, n=name: standin.metadata_gets(i, n), bits, standin.pids)

        real: RealGlanceUpstream | None = None
        real_routes: list[Route] = []
        if "real" in args.only:
            try:
                real = RealGlanceUpstream(run_dir / "glance")
            except RuntimeError as exc:
                results.notes.append(f"real glance-api scenario skipped: {exc}")
            if real is not None:
                progress("starting a real glance-api 33 and uploading "
                         f"{4 * args.reps + 1} images of {human_size(args.real_size)}")
                stoppers.append(real.stop)
                real.start()
                real_routes = real.upload(images["real"], 4 * args.reps + 1)
                upstream_urls["real"] = real.url
                upstreams["real"] = Upstream("real", "real glance-api",
                                             real.data_requests, real.metadata_gets,
                                             pids=real.pids)

        imgcaches = {}
        for name, url in upstream_urls.items():
            size = (args.hit_size + args.small_size + max(args.hit_size, args.big_size)
                    if name == "glance" else 2 * max(args.storm_size, args.real_size))
            imgcaches[name] = Imgcache(procs, run_dir / f"imgcache-{name}", url,
                                       max_size=size + (256 << 20))
            imgcaches[name].start()
        nginx_cache = NginxCache(nginx_binary, run_dir / "nginx-cache", upstream_urls, procs,
                                 peer_cache_size(args))
        nginx_cache.start()
        varnish = Varnish(varnishd, run_dir / "varnish", upstream_urls, procs,
                          args.varnish_storage, peer_cache_size(args))
        varnish.start()
        contenders = {
            IMGCACHE: Contender(IMGCACHE, IMGCACHE,
                                {name: ic.url for name, ic in imgcaches.items()},
                                lambda: [p for ic in imgcaches.values()
                                         if (p := ic.pid()) is not None]),
            **{variant: Contender(variant, "cache",
                                  {name: nginx_cache.url(variant, name) for name in upstream_urls},
                                  nginx_cache.pids) for variant in NGINX_VARIANTS},
            VARNISH: Contender(VARNISH, "cache",
                               {name: varnish.url(name) for name in upstream_urls},
                               varnish.pids),
            DIRECT: Contender(DIRECT, "direct", dict(upstream_urls), lambda: []),
        }
        progress(f"running in {run_dir}: stand-in {standin.glance_url}, imgcache "
                 + ", ".join(f"{n} {ic.url}" for n, ic in imgcaches.items())
                 + f"; links shaped with {'tc' if use_tc else 'nginx limit_rate'}")
        bench = PeerBench(procs, standin, contenders, imgcaches, upstreams, routes, checks,
                          scratch, wrk, results)
        try:
            _measure(bench, args, real_routes)
        except Exception:
            for ic in imgcaches.values():
                lifecycle.show_log(ic.log)
            raise
        sizes = Sizes(hit=args.hit_size, storm=args.storm_size, big=args.big_size,
                      small=args.small_size, real=args.real_size, clients=args.clients,
                      storm_clients=args.storm_clients, small_clients=args.small_clients,
                      small_seconds=args.small_seconds,
                      links={name: link_label(name) for name in links})
        machine = [*machine_details(nginx_binary, REPO),
                   ("varnish", _program_version([varnishd, "-V"])),
                   ("wrk", _program_version([wrk, "-v"])),
                   ("glance", real.version() if real else "(not run)"),
                   ("matplotlib", matplotlib_version),
                   ("imgcache event loop", "uvloop (imgcache serve always runs on it)")]
        setup = _setup_lines(args, use_tc, why_not, varnish.storage, bool(real_routes))
    args.output_dir.mkdir(parents=True, exist_ok=True)
    png = args.output_dir / "peers.png"
    drew = chart(results, sizes, png)
    command = "python -m bench.peers.run " + shlex.join(sys.argv[1:])
    text = render(results, checks, sizes, machine, setup, command.strip(), args.reps,
                  png.name if drew else None)
    print(text)
    (args.output_dir / "peers.md").write_text(text)
    progress(f"report written to {args.output_dir / 'peers.md'}"
             + (f" and {png}" if drew else ""))
    return 1 if checks.failed else 0


def _measure(bench: PeerBench, args: argparse.Namespace, real_routes: list[Route]) -> None:
    routes = bench.routes
    if "hits" in args.only:
        measure_hits(bench, [IMGCACHE, NGINX, VARNISH, DIRECT], routes.fixed["hit"],
                     args.reps, args.clients)
    if "small" in args.only:
        measure_small(bench, [IMGCACHE, NGINX, VARNISH, DIRECT], routes.fixed["small"],
                      args.reps, args.small_clients, args.small_seconds)
    if "storm" in args.only:
        measure_storms(bench, [IMGCACHE, NGINX, NGINX_1H, VARNISH, DIRECT], "storm",
                       [name for name, _ in args.links], args.reps, args.storm_clients,
                       args.verify, args.slow_direct)
    if "cold" in args.only:
        measure_cold(bench, [IMGCACHE, NGINX, VARNISH, DIRECT], "hit", args.reps,
                     bench.imgcaches["glance"].cache_dir)
    if "big" in args.only:
        measure_big(bench, "big", args.reps)
    if "real" in args.only and real_routes:
        fresh: Iterator[Route] = iter(real_routes[1:])
        measure_real(bench, [IMGCACHE, NGINX, NGINX_1H, VARNISH, DIRECT], fresh,
                     real_routes[0], args.reps, args.storm_clients, args.verify)


def _setup_lines(args: argparse.Namespace, use_tc: bool, why_not: str,
                 varnish_storage: str, ran_real: bool) -> list[str]:
    links = ", ".join(link_label(name) for name, bits in args.links if bits)
    shaping = ("tc HTB on lo, one class per stand-in port: one link shared by every "
               "connection to it, as a compute node's link to Glance is"
               if use_tc else f"nginx limit_rate per connection ({why_not})")
    held = f"ports whose bandwidth is held to {links} ({shaping})" if links else ""
    unshaped = ("one port with no class and no limit, at loopback speed (the unshaped "
                "loopback link)" if any(bits is None for _, bits in args.links) else "")
    return [
        "Upstream: nginx as a Glance stand-in on Glance's paths (image JSON with size, "
        "checksum, os_hash_value sha512; image files with sendfile from the page cache, "
        "no token checks); for the storms the same on "
        + " and on ".join(part for part in (held, unshaped) if part)
        + ("; and a real glance-api 33 (gunicorn, 2 workers, file store, sqlite, no "
           "keystone) for one storm." if ran_real else "."),
        "imgcache: `imgcache serve` from this repo, defaults (uvloop, decision_ttl 30s), "
        "one process per upstream, its cache and admin socket in the run's dir; cold "
        "entries are evicted (`imgcache evict`) after each measurement.",
        "nginx: `proxy_cache` + `proxy_cache_lock on`, `proxy_cache_valid 200 7d`, "
        "`use_temp_path=off`; *nginx* keeps `proxy_cache_lock_timeout`/`_age` at their 5 s "
        "defaults, *nginx-1h* raises both to 1h. Same nginx build as the stand-in. The "
        "lock settings change only misses, so hits are measured on *nginx*.",
        f"Varnish: streaming on (`beresp.do_stream`), TTL 7 d, storage `{varnish_storage}`, "
        "one listen address and backend per upstream.",
        "direct: the client downloads from the upstream itself, no cache. A direct storm "
        f"expected to take longer than {args.slow_direct:g} s (clients x image / link) is "
        "not run; its computed time is shown instead (`--slow-direct 1000` runs it).",
        f"Clients: curl processes started together (time to first byte = "
        f"`%{{time_starttransfer}}`, wall = first start to last exit), wrk for scenario 6; "
        f"cold measurements use an image id the contender has never seen. The storm "
        f"bound is the larger of one direct download over the link and nginx serving the "
        f"already-local file to the same {args.storm_clients} clients (this machine's "
        f"fan-out limit), both measured in every repetition.",
    ]


def main(argv: list[str] | None = None) -> int:
    """Entry point: runs the comparison; exit 1 on a failed check, 130 on interruption."""
    return lifecycle.exit_status(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
