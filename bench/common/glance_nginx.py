"""nginx as a fast Glance stand-in (upstream of imgcache) and as the static-file baseline.

One nginx process (one worker per core, sendfile on) serves two servers on 127.0.0.1:
- "glance": Glance's paths, ``GET /v2/images/{id}`` (the image JSON) and
  ``GET /v2/images/{id}/file`` (the bytes, with ``Content-MD5``); no token checks.
- "local": the same files on the same data path, a plain static file server: the baseline
  that imgcache's cache hits are compared with;
- optionally more Glance servers like "glance" on ports of their own (``ExtraGlance``),
  whose bandwidth is held to a compute node's link (see ``shaping``).
Each server has its own access log, so data GETs (and their bytes) that reached a Glance
server can be counted.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.common.images import TestImage
from bench.common.installs import find_or_install
from bench.common.nginx_base import NginxProcess, main_config, server_block
from bench.common.procs import Processes, free_port

_LOG_FORMAT = "$request_method $uri $status $body_bytes_sent $request_time"


@dataclass(frozen=True)
class Route:
    """An image id under which a file is exposed."""

    image_id: str
    image: TestImage


def find_or_install_nginx() -> str:
    """Path of the nginx binary; installs the Debian package first when it is missing
    (root only), without letting the package start a system-wide nginx."""
    return find_or_install("nginx", "nginx")


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


@dataclass(frozen=True)
class ExtraGlance:
    """One more Glance stand-in server on a port of its own (same routes as "glance"), for
    an upstream link of limited bandwidth: ``limit_rate`` bytes/s per connection in nginx,
    or None when the link is shaped outside nginx (tc on the port)."""

    name: str
    limit_rate: int | None = None


def _locations(routes: list[Route], meta_dir: Path, with_metadata: bool,
               limit_rate: int | None = None) -> str:
    blocks = []
    limit = f" limit_rate {limit_rate};" if limit_rate else ""
    for route in routes:
        base = f"/v2/images/{route.image_id}"
        if with_metadata:
            meta = meta_dir / f"{route.image_id}.json"
            if not meta.exists():
                meta.write_text(glance_json(route))
            blocks.append(f"location = {base} {{ default_type application/json; "
                          f"alias {meta}; }}")
        blocks.append(f"location = {base}/file {{ default_type application/octet-stream; "
                      f'alias {route.image.path}; add_header Content-MD5 "{route.image.md5}";'
                      f"{limit} }}")
    return "\n        ".join(blocks)


def render_config(prefix: Path, glance_port: int, local_port: int,
                  glance_routes: list[Route], local_routes: list[Route],
                  extra: list[tuple[ExtraGlance, int]] | None = None) -> str:
    """nginx.conf for both servers (and ``extra`` Glance servers, each with its port);
    writes the image JSON files under ``prefix/meta``."""
    meta_dir = prefix / "meta"
    meta_dir.mkdir(parents=True, exist_ok=True)
    servers = [
        server_block(prefix, "glance", glance_port,
                     _locations(glance_routes, meta_dir, with_metadata=True)),
        server_block(prefix, "local", local_port,
                     _locations(local_routes, meta_dir, with_metadata=False)),
    ]
    extra_servers = "\n".join(
        server_block(prefix, server.name, port,
                     _locations(glance_routes, meta_dir, with_metadata=True,
                                limit_rate=server.limit_rate))
        for server, port in extra or [])
    return main_config(prefix, worker_connections=1024, log_format=_LOG_FORMAT,
                       http_body="\n".join([*servers, extra_servers]))


class Nginx(NginxProcess[str]):
    """The nginx process of one run (foreground master, stopped with the run)."""

    def __init__(self, binary: str, prefix: Path, glance_routes: list[Route],
                 local_routes: list[Route], procs: Processes,
                 extra: Sequence[ExtraGlance] = ()) -> None:
        self.glance_port = free_port()
        self.local_port = free_port()
        ports = {"glance": self.glance_port, "local": self.local_port}
        ports.update({server.name: free_port() for server in extra})
        super().__init__(binary, prefix, procs, ports)
        self.conf.write_text(render_config(prefix, self.glance_port, self.local_port,
                                           glance_routes, local_routes,
                                           [(server, ports[server.name]) for server in extra]))

    @property
    def glance_url(self) -> str:
        """Base URL of the Glance stand-in."""
        return f"http://127.0.0.1:{self.glance_port}"

    @property
    def local_url(self) -> str:
        """Base URL of the static-file baseline server."""
        return f"http://127.0.0.1:{self.local_port}"

    def url(self, server: str) -> str:
        """Base URL of one of the servers ("glance", "local" or an extra one's name)."""
        return f"http://127.0.0.1:{self.ports[server]}"

    def data_gets(self, image_id: str, server: str = "glance") -> int:
        """How many ``GET /v2/images/{id}/file`` the Glance stand-in has logged, but
        imgcache's one-byte download checks (see ``download_checks``)."""
        return len(self.data_requests(image_id, server))

    def data_requests(self, image_id: str, server: str = "glance") -> list[int]:
        """The body bytes sent for each ``GET /v2/images/{id}/file`` that ``server`` has
        logged (nginx logs a request when it ends), but the one-byte download checks."""
        return [sent for status, sent in self._logged(f"GET /v2/images/{image_id}/file ",
                                                      server) if (status, sent) != (206, 1)]

    def download_checks(self, image_id: str, server: str = "glance") -> int:
        """How many of imgcache's download checks (a 206 of one byte) ``server`` logged."""
        return sum((status, sent) == (206, 1) for status, sent in
                   self._logged(f"GET /v2/images/{image_id}/file ", server))

    def metadata_gets(self, image_id: str, server: str = "glance") -> int:
        """How many ``GET /v2/images/{id}`` (the image JSON) ``server`` has logged."""
        return len(self._logged(f"GET /v2/images/{image_id} ", server))

    def _logged(self, wanted: str, server: str) -> list[tuple[int, int]]:
        log = self.prefix / f"{server}-access.log"
        if not log.exists():
            return []
        with log.open() as lines:
            # _LOG_FORMAT: method uri status body_bytes_sent request_time
            return [(int(fields[2]), int(fields[3])) for line in lines
                    if line.startswith(wanted) and (fields := line.split())]
