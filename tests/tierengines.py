"""Real tier nodes for tests and benchmarks: Squid and Apache Traffic Server run from the
configuration shipped in config/tier/, its @NAME@ placeholders filled in, each in a work
directory of its own and optionally inside a network namespace (``ip netns exec``).

Both come from Debian (``apt-get install squid trafficserver``); `make system-deps` installs
them. Running as root, each drops to its Debian user (proxy, trafficserver), which gets the
work directory."""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, TypeVar
from urllib.parse import urlsplit

from imgcache.tier import TierNode, rendezvous_order


class _HasUrl(Protocol):
    @property
    def url(self) -> str: ...


NodeT = TypeVar("NodeT", bound=_HasUrl)
REPO = Path(__file__).resolve().parent.parent
TIER_CONFIG = REPO / "config" / "tier"
_PLACEHOLDER = re.compile(r"@([A-Z_]+)@")
#: The CA bundle of a tier node not given Glance's CA (and the one Traffic Server is given,
#: unused, in front of an http Glance).
SYSTEM_CA = Path("/etc/ssl/certs/ca-certificates.crt")
#: Squid 5.7 (Debian's, built with GnuTLS) fails every read from a TLS 1.3 server that sends
#: session tickets (ERR_READ_ERROR, "read failure: (0) No error"): TLS 1.2 to Glance.
SQUID_TLS_OPTIONS = "tls-options=NORMAL:-VERS-TLS1.3"


def render(template: Path, values: dict[str, str]) -> str:
    """The template's text with every @NAME@ replaced; a placeholder without a value fails."""
    text = template.read_text()
    missing = sorted(set(_PLACEHOLDER.findall(text)) - values.keys())
    if missing:
        raise KeyError(f"{template}: no value for {', '.join(missing)}")
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], text)


def ranked(image_id: str, nodes: Sequence[NodeT]) -> list[NodeT]:
    """Tier nodes (anything with a ``url``) in the order imgcache tries them for
    ``image_id``."""
    by_url = {node.url: node for node in nodes}
    return [by_url[n.url] for n in rendezvous_order(image_id, [TierNode(u) for u in by_url])]


def engine_workdir() -> Path:
    """A new directory for tier nodes' files that their users (proxy, trafficserver) can
    reach: pytest's and mkdtemp's own are private to root. The caller removes it."""
    path = Path(tempfile.mkdtemp(prefix="imgcache-tier-"))
    path.chmod(0o755)
    return path


def engine_available(name: str) -> bool:
    """Whether the engine's binary is installed."""
    return shutil.which({"squid": "squid", "trafficserver": "traffic_server"}[name]) \
        is not None or Path({"squid": "/usr/sbin/squid",
                             "trafficserver": "/usr/bin/traffic_server"}[name]).exists()


class TierEngine:
    """One tier node process: ``start``, ``stop``, ``kill``; its ``url`` for [tier] urls."""

    name = ""
    user = ""

    def __init__(self, workdir: Path, *, listen: str, port: int, glance_url: str,
                 compute_nets: list[str], ca_file: Path | None = None,
                 cache_mb: int = 4096, netns: str | None = None) -> None:
        self.workdir = workdir
        self.listen, self.port = listen, port
        self.glance_url = glance_url.rstrip("/")
        self.compute_nets = compute_nets
        # Copied where the engine's user can read it (the caller's may be private to root).
        self.ca_file = None if ca_file is None else workdir / "glance-ca.pem"
        self._ca_source = ca_file
        self.cache_mb = cache_mb
        self.netns = netns
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The node's base URL."""
        return f"http://{self.listen}:{self.port}"

    def _in_ns(self, cmd: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *cmd] if self.netns else cmd

    def _copy_ca(self) -> None:
        if self._ca_source is not None and self.ca_file is not None:
            shutil.copyfile(self._ca_source, self.ca_file)
            self.ca_file.chmod(0o644)

    def _give_to_user(self, *paths: Path) -> None:
        entry = pwd.getpwnam(self.user)
        for path in paths:
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def _command(self) -> list[str]:
        raise NotImplementedError

    def prepare(self) -> None:
        """Write the configuration and initialise the cache (before ``start``)."""
        raise NotImplementedError

    def start(self, timeout: float = 60) -> None:
        """Start the engine and wait until it answers HTTP on its port."""
        log = (self.workdir / "stdout.log").open("ab")
        self.proc = subprocess.Popen(self._in_ns(self._command()), stdin=subprocess.DEVNULL,
                                     stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            probe = subprocess.run(
                self._in_ns(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                             "--noproxy", "*", "--max-time", "2", f"{self.url}/"]),
                capture_output=True, text=True, check=False)
            if probe.stdout.strip() not in ("", "000"):
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see "
                                   f"{self.workdir}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not answer on {self.url}; see "
                                   f"{self.workdir}")
            time.sleep(0.2)

    def kill(self) -> None:
        """kill -9 the engine's whole process group (a node dying mid-transfer)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        """Stop the engine (SIGTERM, then SIGKILL after 10 s); idempotent."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        # Helpers whose parent is gone (Squid's unlinkd) go too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)


class SquidTier(TierEngine):
    """Squid from config/tier/squid.conf."""

    name = "squid"
    user = "proxy"

    def prepare(self) -> None:
        """Write squid.conf and create the cache directories (squid -z)."""
        cache, run = self.workdir / "cache", self.workdir / "run"
        for path in (self.workdir, cache, run):
            path.mkdir(parents=True, exist_ok=True)
        self._give_to_user(self.workdir, cache, run)
        self._copy_ca()
        glance = urlsplit(self.glance_url)
        tls = (f"tls tls-cafile={self.ca_file or SYSTEM_CA} {SQUID_TLS_OPTIONS}"
               if glance.scheme == "https" else "")
        config = render(TIER_CONFIG / "squid.conf", {
            "LISTEN": f"{self.listen}:{self.port}", "COMPUTE_NETS": " ".join(self.compute_nets),
            "GLANCE_HOST": glance.hostname or "", "GLANCE_PORT": str(glance.port or 443),
            "GLANCE_TLS": tls, "CACHE_DIR": str(cache), "CACHE_MB": str(self.cache_mb),
            "RUN_DIR": str(run)})
        # The ICMP pinger helper needs raw sockets and measures nothing we use.
        (self.workdir / "squid.conf").write_text(config + "pinger_enable off\n")
        subprocess.run(self._in_ns(["squid", "-z", "-N", "-f",
                                    str(self.workdir / "squid.conf")]),
                       check=True, capture_output=True)

    def _command(self) -> list[str]:
        return ["squid", "-N", "-f", str(self.workdir / "squid.conf")]


class TrafficServerTier(TierEngine):
    """Apache Traffic Server from config/tier/trafficserver/, in a runroot of its own."""

    name = "trafficserver"
    user = "trafficserver"

    def prepare(self) -> None:
        """Write the configuration files and a runroot.yaml pointing at them."""
        etc, cache, run = self.workdir / "etc", self.workdir / "cache", self.workdir / "run"
        for path in (self.workdir, etc, cache, run):
            path.mkdir(parents=True, exist_ok=True)
        self._copy_ca()
        ca = self.ca_file or SYSTEM_CA
        values = {
            "LISTEN_ADDR": self.listen, "LISTEN_PORT": str(self.port),
            "GLANCE_URL": self.glance_url, "GLANCE_CA_DIR": str(ca.parent),
            "GLANCE_CA_FILE": ca.name, "COMPUTE_NETS": ", ".join(self.compute_nets),
            "CACHE_DIR": str(cache), "CACHE_SIZE": f"{self.cache_mb}M", "RUN_DIR": str(run),
            "USER": self.user}
        for template in (TIER_CONFIG / "trafficserver").iterdir():
            (etc / template.name).write_text(render(template, values))
        # Files Traffic Server insists on, left empty: defaults.
        for name in ("plugin.config", "hosting.config", "volume.config", "parent.config",
                     "sni.yaml", "ssl_multicert.config", "strategies.yaml", "splitdns.config",
                     "socks.config", "logging.yaml"):
            (etc / name).touch()
        (self.workdir / "runroot.yaml").write_text("\n".join(f"{key}: {value}" for key, value in {
            "prefix": "/usr", "exec_prefix": "/usr", "bindir": "/usr/bin",
            "sbindir": "/usr/sbin", "sysconfdir": etc, "datadir": self.workdir,
            "includedir": "/usr/include", "libdir": "/usr/lib/trafficserver",
            "libexecdir": "/usr/lib/trafficserver/modules", "localstatedir": self.workdir,
            "runtimedir": run, "logdir": run, "cachedir": cache}.items()) + "\n")
        for path in (self.workdir, etc, cache, run):
            self._give_to_user(path)
        for path in etc.iterdir():
            self._give_to_user(path)

    def _command(self) -> list[str]:
        return ["traffic_server", f"--run-root={self.workdir / 'runroot.yaml'}"]


ENGINES: dict[str, type[TierEngine]] = {"squid": SquidTier, "trafficserver": TrafficServerTier}
