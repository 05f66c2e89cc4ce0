"""The load generator for many small requests: wrk (C, keep-alive connections), the same
for every contender. A curl process per 1 MiB request would measure process start-up."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass

from bench.common.curls import TOKEN
from bench.common.procs import Processes

_UNITS = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}
_TIME_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


@dataclass(frozen=True)
class WrkRun:
    """What one wrk run reported."""

    requests: int
    seconds: float
    bytes_read: int
    bad_status: int  # non-2xx/3xx responses
    socket_errors: int  # connect, read, write errors and timeouts
    p50: float  # latency percentiles, seconds
    p99: float

    @property
    def rps(self) -> float:
        """Completed requests per second."""
        return self.requests / self.seconds


def run_wrk(procs: Processes, binary: str, url: str, connections: int, seconds: float,
            threads: int = 2, script: str | None = None) -> WrkRun:
    """``connections`` keep-alive connections fetching ``url`` for ``seconds`` (with
    ``script``, a wrk Lua script file, making the requests)."""
    cmd = [binary, f"-t{min(threads, connections)}", f"-c{connections}",
           f"-d{max(1, round(seconds))}s", "--latency", "--timeout", "30s",
           "-H", f"X-Auth-Token: {TOKEN}", *(("-s", script) if script else ()), url]
    proc = procs.start(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate()
    procs.forget(proc)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk exited with {proc.returncode}: {stderr.strip()}")
    return parse_wrk(stdout)


def parse_wrk(text: str) -> WrkRun:
    """Read wrk's summary (``N requests in Ts, X read``, errors, latency distribution)."""
    done = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m), ([\d.]+)([KMGT]?B) read", text)
    if not done:
        raise RuntimeError(f"wrk printed no summary:\n{text}")
    seconds = float(done.group(2)) * _TIME_UNITS[done.group(3)]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                       text)
    return WrkRun(
        requests=int(done.group(1)), seconds=seconds,
        bytes_read=int(float(done.group(4)) * _UNITS[done.group(5)]),
        bad_status=int(bad.group(1)) if bad else 0,
        socket_errors=sum(int(g) for g in errors.groups()) if errors else 0,
        p50=_percentile(text, "50"), p99=_percentile(text, "99"))


def _percentile(text: str, which: str) -> float:
    match = re.search(rf"^\s+{which}%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.MULTILINE)
    return float(match.group(1)) * _TIME_UNITS[match.group(2)] if match else float("nan")
