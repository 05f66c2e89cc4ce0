"""Real imgcache and stand-in processes for tests about processes: memory, syscalls, exits."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import diskcache

from imgcache.keys import data_file_name
from imgcache.store import Entry

IMGCACHE = str(Path(sys.executable).with_name("imgcache"))


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, timeout: float = 20) -> None:
    """Wait until ``url`` answers with any HTTP status."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class StandinProcess:
    """``python -m imgcache.standin`` with generated images (``rate`` trickles downloads)."""

    def __init__(self, data_dir: Path, image_size: str, images: int = 1,
                 rate: str = "0") -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "imgcache.standin", "--port", str(self.port),
             "--data-dir", str(data_dir), "--image-size", image_size,
             "--images", str(images), "--rate", rate],
            stdout=subprocess.PIPE, text=True, start_new_session=True)
        assert self.proc.stdout is not None
        info = json.loads(self.proc.stdout.readline())
        self.url: str = info["url"]
        self.image_id: str = info["image_id"]
        self.image_ids: list[str] = info["image_ids"]
        self.size: int = info["size"]

    def stop(self) -> None:
        """Stop the process."""
        stop_process(self.proc)


class ImgcacheProcess:
    """``imgcache serve`` as a real process."""

    def __init__(self, upstream: str, cache_dir: Path, max_size: str | None = "2G",
                 extra: tuple[str, ...] = (), admin_socket: Path | None = None,
                 env: dict[str, str] | None = None, wrapper: tuple[str, ...] = (),
                 wait: bool = True, read_stderr: bool = True) -> None:
        """Start the server (``env`` adds variables, ``wrapper`` is a command prefix that
        execs it); unless ``wait`` is False, return once both listeners answer. Unless
        ``read_stderr`` is False, its stderr is read all along; else only from
        ``read_stderr_from_now``."""
        self.port = free_port()
        self.cache_dir = cache_dir
        self.metrics_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}"
        self.admin_socket = admin_socket or cache_dir.parent / f"admin-{self.port}.sock"
        environ = {k: v for k, v in os.environ.items() if not k.startswith("IMGCACHE_")}
        self.proc = subprocess.Popen(
            [*wrapper, IMGCACHE, "serve", "--listen", f"127.0.0.1:{self.port}",
             "--metrics-listen", f"127.0.0.1:{self.metrics_port}", "--upstream", upstream,
             "--cache-dir", str(cache_dir), "--admin-socket", str(self.admin_socket),
             *(("--max-size", max_size) if max_size else ()), *extra],
            env={**environ, **(env or {})}, stderr=subprocess.PIPE, text=True,
            start_new_session=True)
        # Read stderr all along: a busy server (a log line per request) would otherwise drop
        # log lines on a full pipe.
        assert self.proc.stderr is not None
        self.stderr_lines: list[str] = []
        self._drainer = threading.Thread(
            target=self.stderr_lines.extend, args=(self.proc.stderr,), daemon=True)
        if read_stderr:
            self._drainer.start()
        if wait:
            self.wait_until_serving()

    def wait_until_serving(self) -> None:
        """Wait until /healthz and the proxy listener answer."""
        wait_for_http(self.metrics_url + "/healthz")
        wait_for_http(self.url + "/")

    @property
    def pid(self) -> int:
        """The server's process id."""
        return self.proc.pid

    def metric(self, sample: str) -> float:
        """One sample of /metrics, e.g. ``imgcache_fills_total{outcome="committed"}``."""
        with urllib.request.urlopen(self.metrics_url + "/metrics") as response:
            for line in response.read().decode().splitlines():
                if line.startswith(sample + " "):
                    return float(line.split()[-1])
        raise KeyError(sample)

    def wait_for_metric(self, sample: str, value: float, timeout: float = 30) -> None:
        """Wait until a sample reaches ``value``."""
        deadline = time.monotonic() + timeout
        while self.metric(sample) < value:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{sample} stayed below {value}")
            time.sleep(0.05)

    def peak_rss(self) -> int:
        """The process's peak resident memory (VmHWM) in bytes."""
        return self._status_bytes("VmHWM")

    def rss(self) -> int:
        """The server's resident memory (VmRSS) now, in bytes."""
        return self._status_bytes("VmRSS")

    def _status_bytes(self, field: str) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no {field} in /proc status")

    def open_fds(self) -> int:
        """How many file descriptors the server has open now."""
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def open_cache_files(self) -> int:
        """How many of the server's fds are committed cache files (hits keep recently read
        ones open: imgcache.openfiles)."""
        data = f"{self.cache_dir / 'data'}/"
        return sum(target.startswith(data) for target in fd_targets(self.pid))

    def client_connections(self) -> int:
        """How many client connections (established, on its listening port) the server
        holds open now."""
        return self._sockets(lambda local, remote, state: local == self.port and state == "01")

    def upstream_connections(self, upstream_port: int) -> int:
        """How many of the server's sockets are connections to ``upstream_port``."""
        return self._sockets(lambda local, remote, state: remote == upstream_port)

    def _sockets(self, wanted: Callable[[int, int, str], bool]) -> int:
        """The server's TCP sockets whose (local port, remote port, state) are ``wanted``."""
        inodes = set()
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with contextlib.suppress(FileNotFoundError):
                for line in Path(table).read_text().splitlines()[1:]:
                    fields = line.split()
                    local, remote = (int(f.rsplit(":", 1)[1], 16) for f in fields[1:3])
                    if wanted(local, remote, fields[3]):
                        inodes.add(f"socket:[{fields[9]}]")
        return len(set(fd_targets(self.pid)) & inodes)

    def read_stderr_from_now(self) -> None:
        """Start reading the stderr of a server started with ``read_stderr=False``."""
        self._drainer.start()

    def stop(self) -> str:
        """Stop the server; return everything it wrote on stderr."""
        if self._drainer.ident is None:  # started with read_stderr=False, never read
            self._drainer.start()
        stop_process(self.proc)
        self._drainer.join(10)
        return "".join(self.stderr_lines)


def fd_targets(pid: int | str) -> list[str]:
    """What each open fd of process ``pid`` ("self" for this one) points at, as
    /proc/PID/fd shows it (a file path, " (deleted)" appended once unlinked, or socket:[N])."""
    targets = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile
            targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return targets


def stop_process(proc: subprocess.Popen[Any], grace: float = 10) -> None:
    """SIGTERM a process started with start_new_session=True, then kill what is left of its
    process group (gunicorn workers, say) after ``grace`` seconds."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def make_cache(cache_dir: Path, entries: int, pinned: int = 0) -> None:
    """A cache directory with ``entries`` committed 4 KiB images, as a real run leaves it;
    the ``pinned`` most recently used ones are pinned."""
    data = cache_dir / "data"
    data.mkdir(parents=True)
    (cache_dir / "partial").mkdir()
    index = diskcache.Cache(str(cache_dir / "index"), eviction_policy="none", cull_limit=0,
                            size_limit=2**62, statistics=False)
    now = time.time()
    with index.transact():
        for number in range(entries):
            image_id = str(uuid.uuid4())
            name = data_file_name(image_id, number)
            (data / name).write_bytes(b"x" * 4096)
            entry = Entry(image_id, f"size_only:::{4096}", 4096, name, now, now + number,
                          pinned=number >= entries - pinned)
            index.set(image_id, dataclasses.asdict(entry))
    index.close()
