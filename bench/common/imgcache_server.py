"""The imgcache server under test, run as its console script from the repo's venv."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from bench.common.curls import fetch_text
from bench.common.procs import Processes, free_port, wait_listening

_COMMITTED = 'imgcache_fills_total{outcome="committed"}'
_SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*(?:\{[^}]*\})?)\s+(\S+)$")


def imgcache_binary() -> Path:
    """The ``imgcache`` script next to the running interpreter (the repo's .venv)."""
    return Path(sys.executable).parent / "imgcache"


class Imgcache:
    """One ``imgcache serve`` process on 127.0.0.1, with its own cache dir and log file."""

    def __init__(self, procs: Processes, workdir: Path, upstream_url: str,
                 max_size: int, extra: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.metrics_port = free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        self.log = workdir / "imgcache.log"
        self.cache_dir = workdir / "cache"
        # In the run's dir: the default /run/imgcache/imgcache.sock may be another run's.
        self.admin_socket = workdir / "admin.sock"
        self._procs = procs
        self._cmd = [str(imgcache_binary()), "serve",
                     "--listen", f"127.0.0.1:{self.port}",
                     "--metrics-listen", f"127.0.0.1:{self.metrics_port}",
                     "--upstream", upstream_url,
                     "--cache-dir", str(self.cache_dir),
                     "--admin-socket", str(self.admin_socket),
                     "--max-size", str(max_size), *extra]
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Base URL of the proxy listener."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start the server and wait until /healthz answers."""
        # The server runs on its defaults plus our flags, whatever IMGCACHE_* the shell has.
        env = {k: v for k, v in os.environ.items() if not k.startswith("IMGCACHE_")}
        with self.log.open("wb") as out:
            self._proc = self._procs.start(self._cmd, stdout=out, stderr=subprocess.STDOUT,
                                           env=env)
        wait_listening(self.port, self._proc, self.log)
        wait_listening(self.metrics_port, self._proc, self.log)
        deadline = time.monotonic() + 30
        while True:
            try:
                fetch_text(self._procs, f"http://127.0.0.1:{self.metrics_port}/healthz")
                return
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL)."""
        if self._proc is not None:
            self._procs.stop(self._proc)
            self._proc = None

    def pid(self) -> int | None:
        """The server's pid while it runs."""
        return self._proc.pid if self._proc is not None else None

    def evict(self, *image_ids: str) -> None:
        """Remove cached images through the management socket (``imgcache evict``)."""
        subprocess.run([str(imgcache_binary()), "evict", "--socket", str(self.admin_socket),
                        *image_ids], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, timeout=60)

    def metrics(self) -> dict[str, float]:
        """Current Prometheus samples, keyed by name with labels as exposed, e.g.
        ``imgcache_fills_total{outcome="committed"}``."""
        text = fetch_text(self._procs, f"http://127.0.0.1:{self.metrics_port}/metrics")
        samples = {}
        for line in text.splitlines():
            match = _SAMPLE.match(line)
            if match and not line.startswith("#"):
                samples[match.group(1)] = float(match.group(2))
        return samples

    def committed_fills(self) -> int:
        """``imgcache_fills_total{outcome="committed"}``."""
        return int(self.metrics().get(_COMMITTED, 0))

    def wait_committed(self, target: int, timeout: float = 180.0) -> tuple[int, float]:
        """Wait until ``target`` fills have committed and none is in progress (the fill's
        fdatasync and rename end after its clients got their last byte). Returns the
        committed count and the seconds waited; gives up after ``timeout``."""
        started = time.perf_counter()
        deadline = time.monotonic() + timeout
        while True:
            samples = self.metrics()
            committed = int(samples.get(_COMMITTED, 0))
            idle = samples.get("imgcache_fills_in_progress", 0) == 0
            if (committed >= target and idle) or time.monotonic() > deadline:
                return committed, time.perf_counter() - started
            time.sleep(0.05)
