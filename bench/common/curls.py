"""The load generator: curl processes (a C client), one per download.

Each download writes its body to /dev/null (or to a file when its hash is to be checked) and
prints one line of ``-w`` figures, which is all the benchmark reads back.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass

from bench.common.procs import Processes

#: Token sent on every request; the Glance stand-in does not check it, imgcache forwards it.
TOKEN = "bench-token"
#: ``%header{}`` needs curl >= 7.84.
_WRITE_OUT = ("%{http_code} %{size_download} %{time_starttransfer} %{time_total} "
              "%header{x-cache-status}\\n")


@dataclass(frozen=True)
class Download:
    """What curl reported about one download."""

    status: int
    size: int
    ttfb: float  # seconds to the first body byte (%{time_starttransfer})
    total: float  # seconds for the whole transfer (%{time_total})
    cache_status: str  # X-Cache-Status, "" when absent
    error: str = ""  # curl's complaint when it failed (exit status != 0)

    @property
    def mb_per_s(self) -> float:
        """Throughput in MB/s (10^6 bytes per second)."""
        return self.size / self.total / 1e6


@dataclass(frozen=True)
class Batch:
    """Downloads started together: each one's figures and the wall time until all ended."""

    downloads: list[Download]
    wall: float

    @property
    def aggregate_mb_per_s(self) -> float:
        """All bytes received over the wall time, in MB/s."""
        return sum(d.size for d in self.downloads) / self.wall / 1e6


def curl_command(url: str, output: str = "/dev/null") -> list[str]:
    """The curl command line for one download of ``url`` into ``output``."""
    return ["curl", "--silent", "--show-error", "--noproxy", "*", "--max-time", "600",
            "--header", f"X-Auth-Token: {TOKEN}", "--output", output,
            "--write-out", _WRITE_OUT, url]


def run_batch(procs: Processes, url: str, outputs: list[str]) -> Batch:
    """Start one curl per entry of ``outputs`` at once (all fetching ``url``); wait for all.

    The wall time runs from just before the first process is started to the exit of the
    last one."""
    started = time.perf_counter()
    running = [procs.start(curl_command(url, out), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True) for out in outputs]
    results = []
    for proc in running:
        stdout, stderr = proc.communicate()
        procs.forget(proc)
        results.append((proc.returncode, stdout, stderr))
    wall = time.perf_counter() - started
    return Batch([_parse(rc, out, err) for rc, out, err in results], wall)


def download(procs: Processes, url: str, output: str = "/dev/null") -> Download:
    """One download of ``url``; curl's own timings are the figures."""
    return run_batch(procs, url, [output]).downloads[0]


def _parse(returncode: int, stdout: str, stderr: str) -> Download:
    fields = stdout.split()
    if len(fields) < 4:
        raise RuntimeError(f"curl printed no figures (exit {returncode}): {stderr.strip()}")
    error = f"curl exit {returncode}: {stderr.strip()}" if returncode else ""
    return Download(status=int(fields[0]), size=int(fields[1]), ttfb=float(fields[2]),
                    total=float(fields[3]), cache_status=fields[4] if len(fields) > 4 else "",
                    error=error)


def fetch_text(procs: Processes, url: str) -> str:
    """GET a small text resource (metrics, health) with curl; raises unless 2xx."""
    proc = procs.start(["curl", "--silent", "--show-error", "--fail", "--noproxy", "*",
                        "--max-time", "10", url],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate()
    procs.forget(proc)
    if proc.returncode != 0:
        raise RuntimeError(f"curl {url}: {stderr.strip()}")
    return stdout


def data_url(base: str, image_id: str) -> str:
    """URL of an image's data on a server with Glance's paths."""
    return f"{base}/v2/images/{image_id}/file"
