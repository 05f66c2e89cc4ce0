"""What every nginx of the benchmark shares (the Glance stand-in of ``glance_nginx.py`` and
the ``proxy_cache`` of ``peers/caches.py``): the main config around its servers, and the
foreground process (config check, start, wait for its ports, pids).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Generic, TypeVar

from bench.common.procs import Processes, group_pids, wait_listening

#: What names a server of an nginx (its ``ports`` key).
K = TypeVar("K")


def main_config(prefix: Path, *, worker_connections: int, log_format: str,
                http_body: str) -> str:
    """nginx.conf: one foreground master (as root when run by root) with its pid, logs and
    temp paths under ``prefix``, sendfile on, the access log format ``bench`` =
    ``log_format``, and ``http_body`` (indented directives and ``server`` blocks) closing the
    ``http`` block."""
    temp = prefix / "temp"
    user = "user root;" if os.geteuid() == 0 else ""
    return f"""
{user}
worker_processes auto;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections {worker_connections}; }}
http {{
    types {{ }}
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 65;
    server_tokens off;
    log_format bench '{log_format}';
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
{http_body}
}}
"""


def server_block(prefix: Path, name: str, port: int, body: str) -> str:
    """A ``server`` on 127.0.0.1:``port`` logging to ``prefix/NAME-access.log`` (format
    ``bench``), with ``body`` (its locations, indented after the first line)."""
    return f"""    server {{
        listen 127.0.0.1:{port};
        access_log {prefix}/{name}-access.log bench;
        {body}
    }}"""


class NginxProcess(Generic[K]):
    """One nginx of a run: its prefix dir, and its foreground master started with the run's
    processes (stopped with them), listening on ``ports`` (server -> port). Subclasses
    write ``conf``."""

    def __init__(self, binary: str, prefix: Path, procs: Processes,
                 ports: dict[K, int]) -> None:
        self.prefix = prefix
        self.ports = ports
        prefix.mkdir(parents=True, exist_ok=True)
        (prefix / "temp").mkdir(exist_ok=True)
        self.conf = prefix / "nginx.conf"
        self._cmd = [binary, "-p", str(prefix), "-e", str(prefix / "error.log"),
                     "-c", str(self.conf)]
        self._procs = procs
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Check the config, start nginx and wait until every server accepts connections."""
        subprocess.run([*self._cmd, "-t", "-q"], check=True)
        with (self.prefix / "nginx.out").open("wb") as out:
            self._proc = self._procs.start(self._cmd, stdout=out, stderr=subprocess.STDOUT)
        for port in self.ports.values():
            wait_listening(port, self._proc, self.prefix / "error.log")

    def pids(self) -> list[int]:
        """The master, its workers (and a cache manager) while nginx runs."""
        return group_pids(self._proc.pid) if self._proc is not None else []
