"""What Glance's download check costs a hit: ``.venv/bin/python -m bench.auth.authcost``.

Two ``imgcache serve`` in front of one fast Glance stand-in (nginx: the image JSON, and the
bytes with Range support, so the check is answered as a file-store Glance answers it), the
same image cached in both: one asks Glance's download policy (``--policy-check download``:
the metadata GET and a one-byte data GET, at once), the other only the metadata GET
(``--policy-check metadata``, the old path). Measured in the same run, alternating:

1. time to first byte of a HIT for a caller imgcache has not seen yet (a fresh token each
   request, so each one asks Glance): curl's ``time_starttransfer``, median and p90;
2. HITs per second with a distinct token on every request (wrk, a Lua script making a new
   token per request), and with one token (the decision remembered) for reference.

Writes bench/results/authcost.md. Glance here answers in microseconds: the figures are what
imgcache's own extra request costs; a real Glance adds its own time to each question (one
policy check and one database read for the download check).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

from bench.common.glance_nginx import Nginx, Route, find_or_install_nginx
from bench.common.images import ensure_image, parse_size
from bench.common.imgcache_server import Imgcache
from bench.common.installs import find_or_install
from bench.common.lifecycle import (
    argument_parser,
    exit_status,
    ignore_interrupts,
    restore_interrupts,
    temp_dir,
)
from bench.common.paths import REPO, RESULTS, WORK
from bench.common.procs import Processes
from bench.common.report_parts import machine_details, markdown_table
from bench.common.wrk import run_wrk

MODES = ("download", "metadata")
_FRESH_TOKENS_LUA = """\
-- A token imgcache has never seen on every request: every hit asks Glance.
math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16))
request = function()
  local token = string.format("fresh-%d-%d", math.random(1, 2^31), math.random(1, 2^31))
  return wrk.format("GET", nil, {["X-Auth-Token"] = token})
end
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Options: request counts, image size, wrk duration and connections."""
    parser = argument_parser(__spec__.name, __doc__)
    parser.add_argument("--requests", type=int, default=300,
                        help="first-byte samples per mode (300)")
    parser.add_argument("--size", type=parse_size, default=parse_size("1M"),
                        help="hit image size (1M)")
    parser.add_argument("--seconds", type=float, default=5, help="wrk duration per run (5)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (32)")
    parser.add_argument("--reps", type=int, default=3, help="wrk runs per mode (3)")
    parser.add_argument("--output", type=Path, default=RESULTS / "authcost.md")
    return parser.parse_args(argv)


def first_byte(url: str) -> float:
    """One GET with a fresh token: curl's time to first byte, in seconds."""
    done = subprocess.run(
        ["curl", "-sS", "-f", "-o", "/dev/null", "-w",
         "%{time_starttransfer} %header{x-cache-status}",
         "-H", f"X-Auth-Token: fresh-{uuid.uuid4()}", url],
        capture_output=True, text=True, check=True, timeout=60)
    seconds, status = done.stdout.split()
    if status != "HIT":
        raise RuntimeError(f"expected a HIT, got {status}")
    return float(seconds)


def p90(values: list[float]) -> float:
    """The 90th percentile."""
    return statistics.quantiles(values, n=10)[-1]


def run(args: argparse.Namespace) -> int:
    """Set up, measure, write the report."""
    nginx_binary = find_or_install_nginx()
    wrk = find_or_install("wrk", "wrk")
    WORK.mkdir(parents=True, exist_ok=True)
    route = Route(str(uuid.uuid4()), ensure_image(args.size, WORK / "images"))
    procs = Processes()
    with contextlib.ExitStack() as stack:
        stack.callback(restore_interrupts)
        run_dir = stack.enter_context(temp_dir(WORK, f"authcost-{os.getpid()}-"))
        stack.callback(procs.close)
        stack.callback(ignore_interrupts)
        nginx = Nginx(nginx_binary, run_dir / "nginx", [route], [], procs)
        nginx.start()
        servers = {}
        for mode in MODES:
            server = Imgcache(procs, run_dir / mode, nginx.glance_url,
                              4 * args.size + (64 << 20), extra=("--policy-check", mode))
            server.start()
            url = f"{server.url}/v2/images/{route.image_id}/file"
            subprocess.run(["curl", "-sS", "-f", "-o", "/dev/null", "-H", "X-Auth-Token: t",
                            url], check=True)
            server.wait_committed(1)
            servers[mode] = url
        script = run_dir / "fresh-tokens.lua"
        script.write_text(_FRESH_TOKENS_LUA)
        ttfb: dict[str, list[float]] = {mode: [] for mode in MODES}
        for index in range(args.requests):
            for mode in (MODES if index % 2 == 0 else MODES[::-1]):
                ttfb[mode].append(first_byte(servers[mode]))
        fresh: dict[str, list[float]] = {mode: [] for mode in MODES}
        same: dict[str, list[float]] = {mode: [] for mode in MODES}
        for rep in range(args.reps):
            for mode in (MODES if rep % 2 == 0 else MODES[::-1]):
                runs = run_wrk(procs, wrk, servers[mode], args.connections, args.seconds,
                               script=str(script))
                if runs.bad_status or runs.socket_errors:
                    raise RuntimeError(f"{mode}: {runs.bad_status} bad answers, "
                                       f"{runs.socket_errors} socket errors")
                fresh[mode].append(runs.rps)
                same[mode].append(run_wrk(procs, wrk, servers[mode], args.connections,
                                          args.seconds).rps)
        checks = {mode: nginx.download_checks(route.image_id) for mode in MODES}
    text = report(args, ttfb, fresh, same, checks,
                  machine_details(nginx_binary, REPO))
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    return 0


def report(args: argparse.Namespace, ttfb: dict[str, list[float]],
           fresh: dict[str, list[float]], same: dict[str, list[float]],
           checks: dict[str, int], machine: list[tuple[str, str]]) -> str:
    """The markdown report."""
    def row(label: str, of: dict[str, list[float]], pick: Callable[[list[float]], float],
            show: Callable[[float], str]) -> list[str]:
        download, metadata = pick(of["download"]), pick(of["metadata"])
        return [label, show(download), show(metadata), f"{download / metadata:.2f}x"]

    def ms(value: float) -> str:
        return f"{value * 1000:.2f} ms"

    def per_s(value: float) -> str:
        return f"{value:.0f}"

    rows = [
        row("time to first byte, fresh token (median)", ttfb, statistics.median, ms),
        row("time to first byte, fresh token (p90)", ttfb, p90, ms),
        row("hits/s, a new token every request (median)", fresh, statistics.median, per_s),
        row("hits/s, one token (decision remembered)", same, statistics.median, per_s),
    ]
    return "\n".join([
        "# The cost of asking Glance's download policy", "",
        f"`python -m bench.auth.authcost` ({args.requests} first-byte samples per mode, "
        "alternating; "
        f"wrk {args.connections} connections x {args.seconds:.0f} s, {args.reps} runs per mode, "
        f"alternating; a {args.size >> 10} KiB cached image). Glance stand-in: nginx.", "",
        markdown_table(["measure", "policy_check = download", "policy_check = metadata",
                        "download / metadata"], rows), "",
        f"Download checks Glance saw (one-byte data GETs of the `download` server): "
        f"{checks['download']}.", "",
        "Raw samples: hits/s download " + ", ".join(f"{v:.0f}" for v in fresh["download"])
        + "; metadata " + ", ".join(f"{v:.0f}" for v in fresh["metadata"]) + ".", "",
        "## Machine", "", markdown_table(["", ""], [list(pair) for pair in machine]), ""])


if __name__ == "__main__":
    sys.exit(exit_status(run, parse_args()))
