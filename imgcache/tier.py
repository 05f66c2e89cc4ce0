"""The shared tier: rack- or row-level HTTP caches (Squid or Traffic Server run as reverse
proxies of Glance's image-data URLs) that fills download image data through, so that a new
image crosses from Glance to a rack once instead of once per compute node.

Which tier node an image goes to is decided here, by rendezvous (highest random weight)
hashing of the image id over the configured node URLs: every compute node that lists the same
URLs sends an image to the same tier node, so the tier fetches it from Glance once, and
adding or removing a node moves only the images that hashed to it.

A fill's download asks its ``SourcePlan`` where each attempt goes: the image's tier nodes
in rendezvous order (skipping nodes in back-off and nodes that failed in this round), then
Glance itself; after a round ended at Glance the next attempt starts a new round. A failure
at a tier node moves the download on to the next source at once, resumed by Range where it
broke; only failures at Glance count against ``[upstream] retries``. A node that cannot be
connected to or goes silent is skipped by every fill for ``[tier] backoff`` (doubled per
consecutive failure, at most ``MAX_BACKOFF``). A tier node's refusal (401, 403, 404) is
Glance's answer relayed: the round goes to Glance, which decides. The tier is never trusted
with correctness: imgcache hashes every byte it gets from a node, and a fill whose bytes
came from the tier and fail verification purges the object from the nodes that sent it
(HTTP PURGE) and is downloaded again straight from Glance.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import ssl
import time
from collections.abc import Callable, Mapping, Sequence

import aiohttp
from yarl import URL

from imgcache.datafetch import (
    BadAnswer,
    ConnectFailed,
    ConnectTimedOut,
    DataClient,
    DataResponse,
    Disconnected,
)
from imgcache.errors import FillError, UpstreamError
from imgcache.metrics import Metrics
from imgcache.upstream import upstream_headers

log = logging.getLogger(__name__)

#: Longest time a failing node is skipped, however many times it failed in a row.
MAX_BACKOFF = 300.0
#: Time allowed for a PURGE of a corrupt object.
PURGE_TIMEOUT = 10.0
#: Statuses with which a tier node relays Glance's refusal of the caller.
REFUSALS = frozenset({401, 403, 404})
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+)$")


class TierFault(Exception):
    """A tier node failed an attempt. ``kind`` is the metric label; ``backs_off`` when the
    node itself looks unreachable (connect failure, silence), so that every fill skips it
    for a while; ``refused`` when it relayed a refusal; ``bad_object`` when what it holds
    for the image has the wrong size (it is purged)."""

    def __init__(self, kind: str, message: str, *, backs_off: bool = False,
                 refused: bool = False, bad_object: bool = False) -> None:
        super().__init__(message)
        self.kind = kind
        self.backs_off = backs_off
        self.refused = refused
        self.bad_object = bad_object


class TierNode:
    """One tier node: its base URL and its health as this imgcache has seen it."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._failures = 0
        self._down_until = 0.0

    def usable(self, now: float) -> bool:
        """False while the node is in back-off after a connection failure or silence."""
        return now >= self._down_until

    def mark_down(self, now: float, backoff: float) -> float:
        """Skip the node for ``backoff`` seconds, doubled for each failure in a row (at most
        MAX_BACKOFF); returns the seconds it is skipped."""
        self._failures += 1
        seconds = min(MAX_BACKOFF, backoff * 2 ** (self._failures - 1))
        self._down_until = now + seconds
        return seconds

    def mark_up(self) -> bool:
        """The node answered well; True if it had been failing."""
        was_failing = self._failures > 0
        self._failures = 0
        self._down_until = 0.0
        return was_failing


def rendezvous_order(image_id: str, nodes: Sequence[TierNode]) -> list[TierNode]:
    """``nodes`` ranked for ``image_id``, highest random weight first. The weight is a hash
    of the node's URL and the image id, the same on every compute node and in every
    process (never Python's salted ``hash``); the configured order does not matter."""

    def weight(node: TierNode) -> bytes:
        return hashlib.blake2b(f"{node.url}\n{image_id}".encode(), digest_size=8).digest()

    return sorted(nodes, key=weight, reverse=True)


def _is_own_failure(exc: BaseException) -> bool:
    """A failure of imgcache's own (the cache disk), not of the source it was reading."""
    return isinstance(exc, FillError) and exc.outcome == "disk_error"


class Tier:
    """The tier nodes of this compute node's rack or row, the connections to them, their
    health, and the purges of corrupt objects."""

    def __init__(self, urls: Sequence[str], metrics: Metrics, *, connect_timeout: float,
                 read_timeout: float, backoff: float,
                 ssl_context: ssl.SSLContext | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.nodes = [TierNode(url) for url in urls]
        self._metrics = metrics
        self._backoff = backoff
        self._clock = clock
        self._ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
        self._timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout,
                                              sock_read=read_timeout)
        self._session: aiohttp.ClientSession | None = None  # PURGEs
        self._data = DataClient(connect_timeout=connect_timeout, read_timeout=read_timeout,
                                ssl_context=ssl_context)
        self._purges: set[asyncio.Task[None]] = set()
        for node in self.nodes:
            metrics.add_tier_node(node.url)

    async def start(self) -> None:
        """Open the client session (call from the running loop)."""
        self._session = aiohttp.ClientSession(
            timeout=self._timeout, auto_decompress=False, read_bufsize=2 << 20,
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=60, ssl=self._ssl),
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            trust_env=False)

    async def close(self) -> None:
        """Wait briefly for purges under way, then close every connection."""
        if self._purges:
            await asyncio.wait(self._purges, timeout=PURGE_TIMEOUT)
        for task in self._purges:
            task.cancel()
        if self._session is not None:
            await self._session.close()

    def plan(self, image_id: str) -> SourcePlan:
        """Where one download of ``image_id`` goes, attempt by attempt."""
        return SourcePlan(self, image_id, rendezvous_order(image_id, self.nodes))

    def usable(self, node: TierNode) -> bool:
        """Whether fills may try ``node`` now."""
        return node.usable(self._clock())

    async def get(self, node: TierNode, path_qs: str, headers: Mapping[str, str],
                  offset: int, end: int, size: int) -> DataResponse:
        """Send an image-data GET to ``node`` (on a connection of its own, its body received
        into reused buffers: ``datafetch``) and check its answer for bytes ``offset``..``end``
        of an image of ``size`` bytes; the caller releases it. Raises TierFault: a 200 or 206
        whose length or range is not what the image's metadata says, a refusal, any other
        status, or no answer."""
        try:
            response = await self._data.get(node.url + path_qs,
                                            upstream_headers(headers, with_body=False))
        except ConnectFailed as exc:
            raise TierFault("connect", f"cannot connect to tier node {node.url}: "
                            f"{exc.os_error}", backs_off=True) from exc
        except (ConnectTimedOut, TimeoutError) as exc:
            raise TierFault("timeout", f"tier node {node.url} did not answer in time",
                            backs_off=True) from exc
        except (ssl.SSLError, Disconnected, BadAnswer, OSError, ValueError) as exc:
            raise TierFault("broken", f"request to tier node {node.url} failed: {exc}") \
                from exc
        try:
            self._check(node, response, offset, end, size)
        except TierFault:
            response.release()
            raise
        if node.mark_up():
            log.info("tier node %s answers again", node.url)
            self._metrics.tier_node_up.labels(node.url).set(1)
        return response

    @staticmethod
    def _check(node: TierNode, response: DataResponse, offset: int, end: int,
               size: int) -> None:
        status = response.status
        if status in REFUSALS:
            raise TierFault("refused", f"tier node {node.url} relayed a refusal ({status})",
                            refused=True)
        if status not in (200, 206):
            raise TierFault("status", f"tier node {node.url} answered {status}")
        length = response.content_length
        if status == 200 and length is not None and length != size:
            raise TierFault("bad_answer", f"tier node {node.url} holds {length} bytes for "
                            f"an image of {size}", bad_object=True)
        if status == 206:
            match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
            if (not match or int(match.group(1)) != offset or int(match.group(3)) != size
                    or int(match.group(2)) != end - 1):
                raise TierFault("bad_answer", f"tier node {node.url} answered bytes "
                                f"{offset}-{end - 1} of {size} with Content-Range "
                                f"{response.headers.get('Content-Range')!r}",
                                bad_object=match is not None and int(match.group(3)) != size)

    def failed(self, node: TierNode, fault: BaseException, path_qs: str) -> None:
        """Record an attempt at ``node`` that failed with ``fault`` (a TierFault, or an
        UpstreamError or FillError raised while its body was read)."""
        kind = fault.kind if isinstance(fault, TierFault) else (
            "size" if isinstance(fault, FillError) else "broken")
        self._metrics.tier_failures.labels(node.url, kind).inc()
        if isinstance(fault, TierFault) and fault.backs_off:
            seconds = node.mark_down(self._clock(), self._backoff)
            self._metrics.tier_node_up.labels(node.url).set(0)
            log.warning("%s; fills skip it for %.0f s", fault, seconds)
        else:
            log.warning("tier node %s failed a download of %s: %s", node.url, path_qs,
                        fault)
        if (isinstance(fault, TierFault) and fault.bad_object) or isinstance(fault, FillError):
            self.purge([node], path_qs)

    def corrupt(self, nodes: Sequence[TierNode], image_id: str, path_qs: str) -> None:
        """Bytes of ``image_id`` that ``nodes`` delivered failed verification: count it
        against them and purge the object there."""
        for node in nodes:
            self._metrics.tier_failures.labels(node.url, "checksum").inc()
        log.error("image %s from tier node(s) %s failed verification; purging it there and "
                  "downloading it again straight from Glance", image_id,
                  ", ".join(node.url for node in nodes))
        self.purge(nodes, path_qs)

    def purge(self, nodes: Sequence[TierNode], path_qs: str) -> None:
        """Remove the object of ``path_qs`` from ``nodes`` (in the background)."""
        for node in nodes:
            task = asyncio.get_running_loop().create_task(self._purge(node, path_qs))
            self._purges.add(task)
            task.add_done_callback(self._purges.discard)

    async def _purge(self, node: TierNode, path_qs: str) -> None:
        assert self._session is not None
        url = URL(node.url + path_qs, encoded=True)
        try:
            async with self._session.request(
                    "PURGE", url, timeout=aiohttp.ClientTimeout(total=PURGE_TIMEOUT)) as answer:
                status = answer.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            status, problem = 0, str(exc) or type(exc).__name__
        else:
            problem = f"it answered {status}"
        # 404: the node no longer had it (another compute node purged it first).
        if status in (200, 204, 404):
            self._metrics.tier_purges.labels("purged").inc()
            log.warning("purged %s from tier node %s (%d)", path_qs, node.url, status)
            return
        self._metrics.tier_purges.labels("failed").inc()
        log.error("could not purge the corrupt object %s from tier node %s: %s; allow "
                  "PURGE from the compute nodes in the tier's configuration (see "
                  "config/tier/) or remove it by hand", path_qs, node.url, problem)


class SourcePlan:
    """The sources one download of one image tries, attempt after attempt: the image's tier
    nodes in rendezvous order, then Glance; a round that ended at Glance starts again."""

    def __init__(self, tier: Tier, image_id: str, ranked: list[TierNode]) -> None:
        self._tier = tier
        self.image_id = image_id
        self._ranked = ranked
        self._tried: set[TierNode] = set()  # failed in this round
        self._to_glance = False  # this round goes to Glance now
        self._at_glance = False  # the last answer of current() was Glance
        self.fed_by: list[TierNode] = []  # nodes that delivered bytes of this download

    def current(self) -> TierNode | None:
        """The tier node the next attempt goes to, or None for Glance."""
        if self._at_glance:  # the attempt at Glance did not finish the download
            self._tried.clear()
            self._to_glance = self._at_glance = False
        if not self._to_glance:
            for node in self._ranked:
                if node not in self._tried and self._tier.usable(node):
                    return node
        self._at_glance = True
        return None

    async def get(self, node: TierNode, path_qs: str, headers: Mapping[str, str],
                  offset: int, end: int, size: int) -> DataResponse:
        """The attempt's GET at ``node`` (see Tier.get)."""
        return await self._tier.get(node, path_qs, headers, offset, end, size)

    def delivered(self, node: TierNode) -> None:
        """``node`` delivered bytes of this download."""
        if node not in self.fed_by:
            self.fed_by.append(node)

    def failed(self, node: TierNode, fault: BaseException, path_qs: str) -> None:
        """The attempt at ``node`` failed: the next one goes to the next source."""
        self._tried.add(node)
        if isinstance(fault, TierFault) and fault.refused:
            self._to_glance = True
        self._tier.failed(node, fault, path_qs)

    def broken(self, exc: BaseException, during: str) -> TierFault:
        """Translate an error raised while reading a tier node's body."""
        if isinstance(exc, TimeoutError):
            return TierFault("timeout", f"the tier node went silent during {during}",
                             backs_off=True)
        return TierFault("broken", f"the tier node broke off during {during}: {exc}")

    def can_fail_over(self, fault: BaseException) -> bool:
        """Whether ``fault``, raised during an attempt at a tier node, is the node's (the
        download moves on) rather than imgcache's own (the fill fails)."""
        return isinstance(fault, TierFault | UpstreamError | FillError) and not \
            _is_own_failure(fault)

    def reject_tier_bytes(self, path_qs: str) -> bool:
        """The download's bytes failed verification. If tier nodes delivered some, purge the
        object from them, count it, and return True: the image must be downloaded again
        straight from Glance."""
        if not self.fed_by:
            return False
        self._tier.corrupt(self.fed_by, self.image_id, path_qs)
        return True
