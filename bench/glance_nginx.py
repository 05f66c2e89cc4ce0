"""nginx as a fast Glance stand-in (upstream of imgcache) and as the static-file baseline.

One nginx process (one worker per core, sendfile on) serves two servers on 127.0.0.1:
- "glance": Glance's paths, ``GET /v2/images/{id}`` (the image JSON) and
  ``GET /v2/images/{id}/file`` (the bytes, with ``Content-MD5``); no token checks.
- "local": the same files on the same data path, a plain static file server: the baseline
  that imgcache's cache hits are compared with.
Each server has its own access log, so data GETs that reached "glance" can be counted.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from images import TestImage
from procs import Processes, free_port, wait_listening

_LOG_FORMAT = "$request_method $uri $status $body_bytes_sent $request_time"


@dataclass(frozen=True)
class Route:
    """An image id under which a file is exposed."""

    image_id: str
    image: TestImage


def find_or_install_nginx() -> str:
    """Path of the nginx binary; installs the Debian package first when it is missing
    (root only), without letting the package start a system-wide nginx."""
    found = _find_nginx()
    if found:
        return found
    if os.geteuid() != 0:
        raise RuntimeError("nginx is not installed; run: apt-get install -y nginx")
    print("nginx missing: apt-get update && apt-get install -y nginx", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # policy-rc.d exit 101 = "do not start services" (honoured by invoke-rc.d and
    # deb-systemd-invoke): the package's own nginx would listen on 0.0.0.0:80.
    policy = Path("/usr/sbin/policy-rc.d")
    added_policy = not policy.exists()
    if added_policy:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    try:
        subprocess.run(["apt-get", "update"], check=True, env=env, stdout=subprocess.DEVNULL)
        subprocess.run(["apt-get", "install", "-y", "nginx"], check=True, env=env,
                       stdout=subprocess.DEVNULL)
    finally:
        if added_policy:
            policy.unlink(missing_ok=True)
    found = _find_nginx()
    if not found:
        raise RuntimeError("apt-get installed nginx but no nginx binary was found")
    return found


def _find_nginx() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)),
        None)


def glance_json(route: Route) -> str:
    """The image's JSON as Glance v2 returns it (the fields imgcache reads, and a few more)."""
    image = route.image
    return json.dumps({
        "id": route.image_id,
        "name": f"bench-{image.size}",
        "status": "active",
        "size": image.size,
        "virtual_size": None,
        "checksum": image.md5,
        "os_hash_algo": "sha512",
        "os_hash_value": image.sha512,
        "visibility": "private",
        "protected": False,
        "os_hidden": False,
        "disk_format": "raw",
        "container_format": "bare",
        "min_disk": 0,
        "min_ram": 0,
        "tags": [],
        "owner": "bench",
        "created_at": "2024-01-01T00:00:00Z",
        "updated_at": "2024-01-01T00:00:00Z",
        "self": f"/v2/images/{route.image_id}",
        "file": f"/v2/images/{route.image_id}/file",
        "schema": "/v2/schemas/image",
    })


def _locations(routes: list[Route], meta_dir: Path, with_metadata: bool) -> str:
    blocks = []
    for route in routes:
        base = f"/v2/images/{route.image_id}"
        if with_metadata:
            meta = meta_dir / f"{route.image_id}.json"
            meta.write_text(glance_json(route))
            blocks.append(f"location = {base} {{ default_type application/json; "
                          f"alias {meta}; }}")
        blocks.append(f"location = {base}/file {{ default_type application/octet-stream; "
                      f'alias {route.image.path}; add_header Content-MD5 "{route.image.md5}"; }}')
    return "\n        ".join(blocks)


def render_config(prefix: Path, glance_port: int, local_port: int,
                  glance_routes: list[Route], local_routes: list[Route]) -> str:
    """nginx.conf for both servers; writes the image JSON files under ``prefix/meta``."""
    meta_dir = prefix / "meta"
    meta_dir.mkdir(parents=True, exist_ok=True)
    temp = prefix / "temp"
    user = "user root;" if os.geteuid() == 0 else ""
    return f"""
{user}
worker_processes auto;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    types {{ }}
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 65;
    server_tokens off;
    log_format bench '{_LOG_FORMAT}';
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    server {{
        listen 127.0.0.1:{glance_port};
        access_log {prefix}/glance-access.log bench;
        {_locations(glance_routes, meta_dir, with_metadata=True)}
    }}
    server {{
        listen 127.0.0.1:{local_port};
        access_log {prefix}/local-access.log bench;
        {_locations(local_routes, meta_dir, with_metadata=False)}
    }}
}}
"""


class Nginx:
    """The nginx process of one run (foreground master, stopped with the run)."""

    def __init__(self, binary: str, prefix: Path, glance_routes: list[Route],
                 local_routes: list[Route], procs: Processes) -> None:
        self.prefix = prefix
        self.glance_port = free_port()
        self.local_port = free_port()
        prefix.mkdir(parents=True, exist_ok=True)
        (prefix / "temp").mkdir(exist_ok=True)
        conf = prefix / "nginx.conf"
        conf.write_text(render_config(prefix, self.glance_port, self.local_port,
                                      glance_routes, local_routes))
        self._cmd = [binary, "-p", str(prefix), "-e", str(prefix / "error.log"),
                     "-c", str(conf)]
        self._procs = procs

    @property
    def glance_url(self) -> str:
        """Base URL of the Glance stand-in."""
        return f"http://127.0.0.1:{self.glance_port}"

    @property
    def local_url(self) -> str:
        """Base URL of the static-file baseline server."""
        return f"http://127.0.0.1:{self.local_port}"

    def start(self) -> None:
        """Check the config, start nginx and wait until both servers accept connections."""
        subprocess.run([*self._cmd, "-t", "-q"], check=True)
        log = self.prefix / "nginx.out"
        with log.open("wb") as out:
            proc = self._procs.start(self._cmd, stdout=out, stderr=subprocess.STDOUT)
        for port in (self.glance_port, self.local_port):
            wait_listening(port, proc, self.prefix / "error.log")

    def data_gets(self, image_id: str) -> int:
        """How many ``GET /v2/images/{id}/file`` the Glance stand-in has logged."""
        log = self.prefix / "glance-access.log"
        if not log.exists():
            return 0
        wanted = f"GET /v2/images/{image_id}/file "
        with log.open() as lines:
            return sum(1 for line in lines if line.startswith(wanted))
