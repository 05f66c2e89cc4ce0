"""The caches an operator would put in front of Glance instead of imgcache, configured as
their documentation suggests for large objects, each started and stopped by the run:

- nginx ``proxy_cache`` with ``proxy_cache_lock on``, in two variants on one nginx: its
  defaults (``proxy_cache_lock_timeout`` and ``proxy_cache_lock_age`` 5 s) and with both
  raised to 1 h, as large-file operators do;
- Varnish with streaming on (``beresp.do_stream``, its default), file storage.

Each listens on one port per upstream (the Glance stand-in at full speed, on a 1 Gbit/s
link, ...), so every scenario has a cold cache path of its own. Neither checks tokens:
whoever asks gets the cached bytes (imgcache asks Glance first, which costs it time).
Both answer ``X-Cache-Status`` (HIT, MISS, ...) like imgcache, for the checks.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from bench.common.images import human_size
from bench.common.nginx_base import NginxProcess, main_config, server_block
from bench.common.procs import Processes, free_port, group_pids, wait_listening

_LOG_FORMAT = ("$request_method $uri $status $body_bytes_sent $request_time "
               "$upstream_cache_status")

#: nginx variant -> the lock directives it sets (none: nginx's defaults, 5 s each).
NGINX_VARIANTS = {
    "nginx": "",
    "nginx-1h": "proxy_cache_lock_timeout 1h; proxy_cache_lock_age 1h;",
}


class NginxCache(NginxProcess[tuple[str, str]]):
    """One nginx with a ``proxy_cache`` server per (variant, upstream)."""

    def __init__(self, binary: str, prefix: Path, upstreams: dict[str, str],
                 procs: Processes, max_size: int) -> None:
        super().__init__(binary, prefix, procs,
                         {(variant, name): free_port() for variant in NGINX_VARIANTS
                          for name in upstreams})
        self.conf.write_text(self._config(upstreams, max_size))

    def _config(self, upstreams: dict[str, str], max_size: int) -> str:
        prefix = self.prefix
        zones, servers = [], []
        for variant, lock in NGINX_VARIANTS.items():
            zone = variant.replace("-", "_")
            zones.append(f"proxy_cache_path {prefix}/cache-{variant} levels=1:2 "
                         f"keys_zone={zone}:16m max_size={max_size} inactive=7d "
                         f"use_temp_path=off;")
            for name, url in upstreams.items():
                servers.append(server_block(prefix, f"{variant}-{name}",
                                            self.ports[variant, name], f"""location / {{
            proxy_pass {url};
            proxy_cache {zone};
            proxy_cache_valid 200 7d;
            proxy_cache_lock on;
            {lock}
            proxy_read_timeout 600s;
            add_header X-Cache-Status $upstream_cache_status always;
        }}"""))
        zone_lines = "\n    ".join(zones)
        server_lines = "\n".join(servers)
        return main_config(prefix, worker_connections=4096, log_format=_LOG_FORMAT,
                           http_body=f"    {zone_lines}\n{server_lines}")

    def url(self, variant: str, upstream: str) -> str:
        """Base URL of the cache of ``variant`` in front of ``upstream``."""
        return f"http://127.0.0.1:{self.ports[variant, upstream]}"


_VCL = """vcl 4.1;
import std;
{backends}
sub vcl_recv {{
{routes}
}}
sub vcl_backend_response {{
    if (beresp.status == 200) {{
        set beresp.ttl = 7d;
        set beresp.grace = 0s;
    }}
    set beresp.do_stream = true;
    return (deliver);
}}
sub vcl_deliver {{
    if (obj.hits > 0) {{
        set resp.http.X-Cache-Status = "HIT";
    }} else {{
        set resp.http.X-Cache-Status = "MISS";
    }}
}}
"""


class Varnish:
    """One varnishd (foreground, no jail, no management port) with a listen address and a
    backend per upstream, streaming on, ``storage`` = ``file`` (in the run dir) or
    ``malloc``."""

    def __init__(self, binary: str, workdir: Path, upstreams: dict[str, str],
                 procs: Processes, storage: str, storage_size: int) -> None:
        self.workdir = workdir
        self.ports = {name: free_port() for name in upstreams}
        workdir.mkdir(parents=True, exist_ok=True)
        backends, routes = [], []
        for index, (name, url) in enumerate(upstreams.items()):
            host, port = url.removeprefix("http://").rsplit(":", 1)
            backends.append(f'backend b{index} {{ .host = "{host}"; .port = "{port}"; '
                            f".connect_timeout = 5s; .first_byte_timeout = 600s; "
                            f".between_bytes_timeout = 600s; }}")
            routes.append(f"    if (std.port(local.ip) == {self.ports[name]}) "
                          f"{{ set req.backend_hint = b{index}; }}")
        vcl = workdir / "bench.vcl"
        vcl.write_text(_VCL.format(backends="\n".join(backends), routes="\n".join(routes)))
        if storage == "file":
            store = f"file,{workdir / 'storage.bin'},{storage_size}"
        else:
            store = f"malloc,{storage_size}"
        self.storage = f"{storage} {human_size(storage_size)}"
        self._cmd = [binary, "-F", "-j", "none", "-n", str(workdir / "state"),
                     *[arg for port in self.ports.values()
                       for arg in ("-a", f"127.0.0.1:{port}")],
                     "-f", str(vcl), "-s", store, "-T", "none"]
        self._procs = procs
        self._proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "varnishd.out"

    def url(self, upstream: str) -> str:
        """Base URL of Varnish in front of ``upstream``."""
        return f"http://127.0.0.1:{self.ports[upstream]}"

    def start(self) -> None:
        """Start varnishd and wait until every address accepts connections."""
        with self.log.open("wb") as out:
            self._proc = self._procs.start(self._cmd, stdout=out, stderr=subprocess.STDOUT)
        for port in self.ports.values():
            wait_listening(port, self._proc, self.log, timeout=60)

    def pids(self) -> list[int]:
        """The manager and the child (cache) process."""
        return group_pids(self._proc.pid) if self._proc else []
