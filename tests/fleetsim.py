"""A fleet on one machine: in a ``netsim.Rack``, an https Glance stand-in, real tier nodes
(Squid or Traffic Server from config/tier/), and on every compute node its own ``imgcache
serve`` process and several booting clients (curl). One storm boots one cold image on every
node at once and measures what the issue asks: Glance's egress bytes (its link's counter),
the wall time until the last node is done, every client's time to first byte; optionally a
tier node is killed (kill -9) once Glance has sent half of the image.

Used by tests/test_fleet.py (small) and bench/fleet/ (the full runs)."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from netsim import GLANCE_PORT, TIER_PORT, Member, Rack
from pki import make_pki
from tierengines import ENGINES, TierEngine, engine_workdir

from imgcache.tier import TierNode, rendezvous_order

IMGCACHE = str(Path(sys.executable).with_name("imgcache"))
TOKEN = "fleet-token"
LISTEN, METRICS = "127.0.0.1:9293", "127.0.0.1:9294"
_WRITE_OUT = "%{http_code} %{size_download} %{time_starttransfer} %{time_total}\\n"
_SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*(?:\{[^}]*\})?)\s+(\S+)$")
#: How often the link counters are read during a storm.
SAMPLE_SECONDS = 0.05


@dataclass
class Client:
    """What curl said about one boot's download."""

    node: int
    status: int
    size: int
    ttfb: float
    total: float
    error: str = ""


@dataclass
class Storm:
    """One storm's figures."""

    scenario: str
    image_size: int
    wall: float  # storm start to the last client's end
    glance_egress: int  # bytes Glance's link sent during the storm
    tier_egress: list[int]
    clients: list[Client]
    node_done: list[float]  # per node, storm start to its last client's end
    killed: str = ""  # tier node killed mid-way
    killed_at: float = 0.0  # seconds into the storm
    metrics: list[dict[str, float]] = field(default_factory=list)  # per node, at the end
    glance_series: list[tuple[float, int]] = field(default_factory=list)  # (s, bytes sent)

    @property
    def failed(self) -> list[Client]:
        """Clients that did not get the whole image with a 200."""
        return [c for c in self.clients if c.status != 200 or c.size != self.image_size
                or c.error]

    def summed(self, name: str) -> float:
        """A metric summed over the nodes."""
        return sum(m.get(name, 0.0) for m in self.metrics)


def _metrics(text: str) -> dict[str, float]:
    samples = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and line.startswith("imgcache_"):
            samples[match.group(1)] = float(match.group(2))
    return samples


class _LinkSampler:
    """Reads a member's tx_bytes every SAMPLE_SECONDS from a shell inside its namespace."""

    def __init__(self, member: Member) -> None:
        script = (f"while :; do cat /sys/class/net/{member.ns}/statistics/tx_bytes; "
                  f"sleep {SAMPLE_SECONDS}; done")
        self._proc = subprocess.Popen(member.run(["sh", "-c", script]), stdout=subprocess.PIPE,
                                      text=True, start_new_session=True)
        self.samples: list[tuple[float, int]] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            self.samples.append((time.monotonic(), int(line)))

    def latest(self) -> int:
        """The last value read (0 before the first)."""
        return self.samples[-1][1] if self.samples else 0

    def stop(self) -> None:
        """Stop the shell."""
        self._proc.kill()
        self._proc.wait()
        self._thread.join(5)


class Fleet:
    """The processes of one simulated rack, started and stopped together."""

    def __init__(self, rack: Rack, *, engine: str, image_size: int, images: int,
                 clients_per_node: int, max_size: str = "8G",
                 cache_root: Path | None = None) -> None:
        self.rack = rack
        self.engine = engine
        self.image_size = image_size
        self.clients_per_node = clients_per_node
        self.max_size = max_size
        self.workdir = engine_workdir()
        # Where the nodes' caches go: on one machine 16 nodes share one disk, which a real
        # fleet does not; a tmpfs keeps that out of the figures.
        self.cache_root = Path(tempfile.mkdtemp(prefix="imgcache-fleet-", dir=cache_root)) \
            if cache_root is not None else self.workdir
        self._images_wanted = images
        self.images: list[str] = []
        self.tiers: list[TierEngine] = []
        self._glance: subprocess.Popen[str] | None = None
        self._imgcaches: list[subprocess.Popen[bytes]] = []
        self.ca_file = self.workdir / "pki" / "ca_file.pem"

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Build the rack, then start Glance and the tier nodes."""
        self.rack.up()
        try:
            pki = make_pki(self.workdir / "pki", server_ips=(self.rack.glance.ip,))
            self._start_glance(pki.server_cert, pki.server_key)
            for index, member in enumerate(self.rack.tiers):
                tier = ENGINES[self.engine](
                    self.workdir / f"tier-{index}", listen=member.ip, port=TIER_PORT,
                    glance_url=self.rack.glance_url, compute_nets=[self.rack.compute_net],
                    ca_file=pki.ca_file, cache_mb=max(1024, 4 * self.image_size >> 20),
                    netns=member.ns)
                tier.prepare()
                tier.start()
                self.tiers.append(tier)
        except BaseException:
            self.close()
            raise

    def _start_glance(self, cert: Path, key: Path) -> None:
        data = self.workdir / "glance"
        data.mkdir()
        self._glance = subprocess.Popen(
            self.rack.glance.run([
                sys.executable, "-m", "imgcache.standin", "--host", self.rack.glance.ip,
                "--port", str(GLANCE_PORT), "--data-dir", str(data),
                "--image-size", str(self.image_size), "--images", str(self._images_wanted),
                "--token", TOKEN, "--cert-file", str(cert), "--key-file", str(key)]),
            stdout=subprocess.PIPE, text=True, start_new_session=True)
        assert self._glance.stdout is not None
        line = self._glance.stdout.readline()
        if not line:
            raise RuntimeError(f"the Glance stand-in exited with {self._glance.wait()}")
        self.images = json.loads(line)["image_ids"]

    def close(self) -> None:
        """Stop every process, delete the rack and the work files."""
        self.stop_imgcaches()
        for tier in self.tiers:
            tier.kill()
        if self._glance is not None and self._glance.poll() is None:
            self._glance.terminate()
            try:
                self._glance.wait(10)
            except subprocess.TimeoutExpired:
                self._glance.kill()
                self._glance.wait()
        self.rack.down()
        shutil.rmtree(self.workdir, ignore_errors=True)
        shutil.rmtree(self.cache_root, ignore_errors=True)

    def start_imgcaches(self, with_tier: bool) -> None:
        """One fresh imgcache (empty cache) per compute node, through the tier or not."""
        self.stop_imgcaches()
        for index, node in enumerate(self.rack.nodes):
            home = self.workdir / f"node-{index:02d}"
            cache = self.cache_root / f"cache-{index:02d}"
            for path in (home, cache):
                shutil.rmtree(path, ignore_errors=True)
                path.mkdir()
            cmd = [IMGCACHE, "serve", "--listen", LISTEN, "--metrics-listen", METRICS,
                   "--upstream", self.rack.glance_url, "--ca-file", str(self.ca_file),
                   "--cache-dir", str(cache), "--admin-socket", str(home / "admin.sock"),
                   "--max-size", self.max_size, "--log-format", "json"]
            if with_tier:
                cmd += ["--tier", ",".join(self.rack.tier_urls)]
            with (home / "imgcache.log").open("wb") as log:
                self._imgcaches.append(subprocess.Popen(
                    node.run(cmd), stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT, start_new_session=True,
                    env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}))
        for index, node in enumerate(self.rack.nodes):
            self._wait_healthy(index, node)

    def _wait_healthy(self, index: int, node: Member) -> None:
        deadline = time.monotonic() + 60
        while True:
            probe = subprocess.run(node.run(["curl", "-sf", "--max-time", "2",
                                             f"http://{METRICS}/healthz"]),
                                   capture_output=True, text=True, check=False)
            if probe.returncode == 0:
                return
            proc = self._imgcaches[index]
            if proc.poll() is not None or time.monotonic() > deadline:
                log = (self.workdir / f"node-{index:02d}" / "imgcache.log").read_text()
                raise RuntimeError(f"imgcache on {node.ns} did not start: {log[-2000:]}")
            time.sleep(0.1)

    def stop_imgcaches(self) -> None:
        """Stop every node's imgcache (SIGTERM: it drains, then exits)."""
        for proc in self._imgcaches:
            if proc.poll() is None:
                proc.terminate()
        for proc in self._imgcaches:
            try:
                proc.wait(40)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._imgcaches = []

    def node_metrics(self, node: Member) -> dict[str, float]:
        """A node's imgcache metrics now."""
        text = subprocess.run(node.run(["curl", "-s", "--max-time", "5",
                                        f"http://{METRICS}/metrics"]),
                              capture_output=True, text=True, check=False).stdout
        return _metrics(text)

    def primary(self, image_id: str) -> int:
        """The index of the tier node an image goes to first."""
        first = rendezvous_order(image_id, [TierNode(u) for u in self.rack.tier_urls])[0]
        return self.rack.tier_urls.index(first.url)

    # -- a storm -----------------------------------------------------------------------------

    def storm(self, scenario: str, image_id: str, kill_primary: bool = False) -> Storm:
        """Boot ``image_id`` on every node at once (``clients_per_node`` each); with
        ``kill_primary`` kill -9 its tier node once Glance has sent half of the image."""
        samplers = [_LinkSampler(m) for m in (self.rack.glance, *self.rack.tiers)]
        try:
            while any(not s.samples for s in samplers):
                time.sleep(0.01)
            glance_before = samplers[0].latest()
            tiers_before = [s.latest() for s in samplers[1:]]
            url = f"http://{LISTEN}/v2/images/{image_id}/file"
            curl = (f"curl -sS --noproxy '*' --max-time 900 -H 'X-Auth-Token: {TOKEN}' "
                    f"-o /dev/null -w '{_WRITE_OUT}' {url}")
            script = f"for i in $(seq {self.clients_per_node}); do {curl} & done; wait"
            started = time.monotonic()
            shells = [subprocess.Popen(node.run(["sh", "-c", script]), stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True,
                                       start_new_session=True) for node in self.rack.nodes]
            killed, killed_at = "", 0.0
            if kill_primary:
                victim = self.primary(image_id)
                while (samplers[0].latest() - glance_before < self.image_size // 2
                       and any(s.poll() is None for s in shells)):
                    time.sleep(0.01)
                self.tiers[victim].kill()
                killed, killed_at = self.rack.tier_urls[victim], time.monotonic() - started
            clients, node_done = self._collect(shells, started)
            wall = max(node_done)
            time.sleep(3 * SAMPLE_SECONDS)  # the counters' last reading
            series = [(t - started, b - glance_before) for t, b in samplers[0].samples
                      if t >= started]
            return Storm(
                scenario=scenario, image_size=self.image_size, wall=wall,
                glance_egress=samplers[0].latest() - glance_before,
                tier_egress=[s.latest() - b for s, b in zip(samplers[1:], tiers_before,
                                                              strict=True)],
                clients=clients, node_done=node_done, killed=killed, killed_at=killed_at,
                metrics=[self.node_metrics(node) for node in self.rack.nodes],
                glance_series=series)
        finally:
            for sampler in samplers:
                sampler.stop()

    def _collect(self, shells: list[subprocess.Popen[str]],
                 started: float) -> tuple[list[Client], list[float]]:
        clients: list[Client] = []
        done = [0.0] * len(shells)
        pending = dict(enumerate(shells))
        while pending:
            for index, shell in list(pending.items()):
                if shell.poll() is not None:
                    done[index] = time.monotonic() - started
                    del pending[index]
            time.sleep(0.005)
        for index, shell in enumerate(shells):
            out, err = shell.communicate()
            lines = out.split("\n")
            for line in (x for x in lines if x.strip()):
                fields = line.split()
                clients.append(Client(index, int(fields[0]), int(fields[1]), float(fields[2]),
                                      float(fields[3])))
            missing = self.clients_per_node - sum(1 for x in lines if x.strip())
            clients += [Client(index, 0, 0, 0.0, 0.0, err.strip() or "no output")
                        for _ in range(missing)]
        return clients, done

    def restart_tier(self, index: int) -> None:
        """Start a killed tier node again (its cache as the kill left it)."""
        with contextlib.suppress(Exception):
            self.tiers[index].kill()
        self.tiers[index].start()
