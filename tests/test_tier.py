"""[tier] urls: fills download through a shared tier, one tier node per image (rendezvous
hashing on the image id), failing over to the next node and then to Glance, resumed where a
transfer broke; every byte verified; a corrupt object purged and the image downloaded again
straight from Glance.

The tier nodes here are Glance stand-ins holding the same images (real aiohttp servers
whose fault knobs make a node reset, stall, answer 5xx, relay a refusal or serve corrupt or
wrong-sized bytes on demand). Real Squid and Traffic Server tiers are tested in
tests/test_tier_engines.py and, across network namespaces, in tests/test_fleet.py."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from inloop import OTHER_TOKEN, TOKEN, Imgcache, ImgcacheFactory, storm
from processes import free_port
from tierengines import ranked

from imgcache.config import load_settings
from imgcache.errors import ConfigError
from imgcache.metrics import Metrics
from imgcache.standin import Fault, GlanceStandin, StandinImage
from imgcache.tier import Tier, TierNode, rendezvous_order

MiB = 1 << 20
TierFactory = Callable[[int], Awaitable[list[GlanceStandin]]]


def sha512(data: bytes) -> str:
    return hashlib.sha512(data).hexdigest()


@pytest.fixture
async def tier_nodes(tmp_path: Path) -> AsyncIterator[TierFactory]:
    """``await tier_nodes(n)``: n stand-ins playing tier nodes (same tokens as Glance)."""
    nodes: list[GlanceStandin] = []

    async def start(count: int) -> list[GlanceStandin]:
        started = []
        for index in range(count):
            data = tmp_path / f"tier-{len(nodes)}"
            await asyncio.to_thread(data.mkdir)
            node = GlanceStandin(data, tokens=(TOKEN, OTHER_TOKEN))
            await node.start()
            nodes.append(node)
            started.append(node)
            del index
        return started

    yield start
    for node in nodes:
        await node.stop()


async def holding(nodes: list[GlanceStandin], image: StandinImage) -> None:
    """Give every tier node the image's bytes under its id (as if it had cached them)."""
    for node in nodes:
        await node.add_image(size=image.size, image_id=image.id)


async def two_nodes_holding(glance: GlanceStandin, tier_nodes: TierFactory,
                            size: int) -> tuple[StandinImage, GlanceStandin, GlanceStandin]:
    """A new image in Glance and in two tier nodes: the image, its first and second node."""
    nodes = await tier_nodes(2)
    image = await glance.add_image(size=size)
    await holding(nodes, image)
    primary, secondary = ranked(image.id, nodes)
    return image, primary, secondary


def data_bytes(server: GlanceStandin, image_id: str) -> int:
    """Body bytes a server sent for the image's data URL (authorization probes included)."""
    return sum(r.body_bytes_sent for r in server.requests
               if r.method == "GET" and r.path == f"/v2/images/{image_id}/file")


def data_requests(server: GlanceStandin, image_id: str) -> list[dict[str, str]]:
    return [r.headers for r in server.requests if r.method == "GET"
            and r.path == f"/v2/images/{image_id}/file" and r.body_bytes_sent > 1]


async def tiered(imgcache_factory: ImgcacheFactory, nodes: list[GlanceStandin],
                 **flags: str) -> Imgcache:
    values = {"tier_urls": ",".join(n.url for n in nodes), "retry_backoff": "0.05s",
              "tier_read_timeout": "1s", "tier_backoff": "30s"}
    values.update(flags)
    return await imgcache_factory(**values)


# -- rendezvous hashing ----------------------------------------------------------------------

def test_rendezvous_spreads_images_and_moves_only_a_removed_nodes_share() -> None:
    urls = [f"http://tier-{i}.rack7:3128" for i in range(4)]
    nodes = [TierNode(u) for u in urls]
    ids = [str(uuid.UUID(int=i * 7919 + 1)) for i in range(4000)]
    first = {i: rendezvous_order(i, nodes)[0].url for i in ids}
    share = Counter(first.values())
    assert set(share) == set(urls)
    assert all(800 <= n <= 1200 for n in share.values()), share  # 1000 each, give or take
    # The configured order does not matter: every compute node agrees.
    assert {i: rendezvous_order(i, nodes[::-1])[0].url for i in ids} == first
    # Removing a node moves exactly its images, each to that image's second choice.
    survivors = [n for n in nodes if n.url != urls[2]]
    for image_id in ids:
        now = rendezvous_order(image_id, survivors)[0].url
        if first[image_id] != urls[2]:
            assert now == first[image_id]
        else:
            assert now == rendezvous_order(image_id, nodes)[1].url


def test_tier_options_are_validated() -> None:
    settings = load_settings({"tier_urls": "http://a:3128, http://b:3128/"}, environ={})
    assert settings.tier_urls == ("http://a:3128", "http://b:3128")
    assert load_settings({}, environ={}).tier_urls == ()
    with pytest.raises(ConfigError, match=r"\[tier\] urls"):
        load_settings({"tier_urls": "squid:3128"}, environ={})
    with pytest.raises(ConfigError, match="listed twice"):
        load_settings({"tier_urls": "http://a:3128,http://a:3128"}, environ={})
    with pytest.raises(ConfigError, match=r"\[tier\] read_timeout"):
        load_settings({"tier_read_timeout": "0"}, environ={})


async def test_a_failing_node_is_skipped_for_its_backoff_then_tried_again() -> None:
    now = [100.0]
    tier = Tier(["http://a:1", "http://b:1"], Metrics(), connect_timeout=1, read_timeout=1,
                backoff=5, clock=lambda: now[0])
    node = tier.nodes[0]
    assert node.mark_down(now[0], 5) == 5 and not tier.usable(node)
    now[0] += 5
    assert tier.usable(node)
    assert node.mark_down(now[0], 5) == 10  # a second failure in a row: doubled
    now[0] += 9.9
    assert not tier.usable(node)
    assert node.mark_up() and tier.usable(node)
    assert node.mark_down(now[0], 5) == 5  # a success reset the count
    for _ in range(20):
        seconds = node.mark_down(now[0], 5)
    assert seconds == 300  # capped


# -- fills through the tier ------------------------------------------------------------------

async def test_an_image_is_fetched_from_its_tier_node_only(
    glance: GlanceStandin, imgcache_factory: ImgcacheFactory, tier_nodes: TierFactory
) -> None:
    image, primary, secondary = await two_nodes_holding(glance, tier_nodes, 8 * MiB)
    imgcache = await tiered(imgcache_factory, [primary, secondary])
    bodies = await storm(imgcache, image.id, clients=8)
    assert {sha512(b) for b in bodies} == {image.os_hash_value}
    assert data_bytes(primary, image.id) == image.size
    assert data_bytes(secondary, image.id) == 0
    assert data_bytes(glance, image.id) <= 1  # at most the authorization probe's byte
    # The caller's credentials went along (the tier fetches from Glance with them).
    assert [h["X-Auth-Token"] for h in data_requests(primary, image.id)] == [TOKEN]
    await imgcache.wait_for_metric('imgcache_fills_total{outcome="committed"}', 1)
    metrics = await imgcache.metrics()
    assert metrics[f'imgcache_source_bytes_total{{source="{primary.url}"}}'] == image.size
    assert metrics[f'imgcache_source_bytes_total{{source="{secondary.url}"}}'] == 0
    assert metrics['imgcache_source_bytes_total{source="glance"}'] == 0
    _, headers, body = await imgcache.get(image.id)
    assert headers["X-Cache-Status"] == "HIT" and sha512(body) == image.os_hash_value


async def test_authorization_still_goes_to_glance_and_a_refused_caller_reaches_no_tier(
    glance: GlanceStandin, imgcache_factory: ImgcacheFactory, tier_nodes: TierFactory
) -> None:
    nodes = await tier_nodes(2)
    image = await glance.add_image(size=2 * MiB, owner_tokens=[TOKEN])
    await holding(nodes, image)
    imgcache = await tiered(imgcache_factory, nodes)
    status, _, _ = await imgcache.get(image.id, token=OTHER_TOKEN)
    assert status == 404  # Glance's answer: the other project cannot see it
    status, _, _ = await imgcache.get(image.id, token="forged")
    assert status == 401
    assert all(data_bytes(node, image.id) == 0 for node in nodes)
    assert all(not node.requests for node in nodes)


async def test_a_down_node_fails_over_to_the_next_and_is_skipped_afterwards(
    glance: GlanceStandin, imgcache_factory: ImgcacheFactory, tier_nodes: TierFactory
) -> None:
    (alive,) = await tier_nodes(1)
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    images = [await glance.add_image(size=2 * MiB) for _ in range(12)]
    for image in images:
        await alive.add_image(size=image.size, image_id=image.id)
    dead_first = [i for i in images
                  if rendezvous_order(i.id, [TierNode(down), TierNode(alive.url)])[0].url == down]
    assert len(dead_first) >= 2, "pick other image ids: the test needs two on the dead node"
    imgcache = await imgcache_factory(tier_urls=f"{down},{alive.url}", tier_backoff="30s")
    for image in images:
        bodies = await storm(imgcache, image.id, clients=3)
        assert {sha512(b) for b in bodies} == {image.os_hash_value}
        assert data_bytes(alive, image.id) == image.size
    metrics = await imgcache.metrics()
    # One failed connection marked the node down; later fills did not try it again.
    assert metrics[f'imgcache_tier_failures_total{{kind="connect",node="{down}"}}'] == 1
    assert metrics[f'imgcache_tier_node_up{{node="{down}"}}'] == 0
    assert metrics[f'imgcache_tier_node_up{{node="{alive.url}"}}'] == 1
    assert metrics['imgcache_source_bytes_total{source="glance"}'] == 0


@pytest.mark.parametrize("fault", [
    Fault(reset_at=3 * MiB + 7, rate=16 * MiB),
    Fault(stall_at=2 * MiB, stall_seconds=10, rate=16 * MiB),
])
async def test_a_node_breaking_mid_body_hands_over_to_the_next_by_range(
    glance: GlanceStandin, imgcache_factory: ImgcacheFactory, tier_nodes: TierFactory,
    fault: Fault,
) -> None:
    image, primary, secondary = await two_nodes_holding(glance, tier_nodes, 8 * MiB)
    primary.faults[image.id] = fault
    imgcache = await tiered(imgcache_factory, [primary, secondary])
    bodies = await storm(imgcache, image.id, clients=8)  # no client fails
    assert {sha512(b) for b in bodies} == {image.os_hash_value}
    (resumed,) = data_requests(secondary, image.id)
    broke_at = int(resumed["Range"].removeprefix("bytes=").split("-")[0])
    assert 0 < broke_at <= (fault.reset_at or fault.stall_at or 0)
    assert data_bytes(secondary, image.id) == image.size - broke_at
    assert data_bytes(glance, image.id) <= 1
    kind = "broken" if fault.reset_at else "timeout"
    metrics = await imgcache.metrics()
    assert metrics[f'imgcache_tier_failures_total{{kind="{kind}",node="{primary.url}"}}'] == 1
    assert metrics['imgcache_fill_resumes_total{how="range"}'] == 1


async def test_when_every_node_fails_glance_itself_resumes_the_fill(
    glance: GlanceStandin, imgcache_factory: ImgcacheFactory, tier_nodes: TierFactory
) -> None:
    image, primary, secondary = await two_nodes_holding(glance, tier_nodes, 8 * MiB)
    primary.faults[image.id] = Fault(reset_at=2 * MiB, rate=16 * MiB)
    secondary.faults[image.id] = Fault(status=503)
    imgcache = await tiered(imgcache_factory, [primary, secondary])
    bodies = await storm(imgcache, image.id, clients=4)
    assert {sha512(b) for b in bodies} == {image.os_hash_value}
    from_glance = data_requests(glance, image.id)
    assert len(from_glance) == 1 and from_glance[0]["Range"].startswith("bytes=")
    broke_at = int(from_glance[0]["Range"].removeprefix("bytes=").split("-")[0])
    assert data_bytes(primary, image.id) == broke_at > 0
    metrics = await imgcache.metrics()
    assert metrics['imgcache_source_bytes_total{source="glance"}'] == image.size - broke_at
    assert metrics[f'imgcache_tier_failures_total{{kind="status",node="{secondary.url}"}}'] == 1
    # A 5xx answer is not a dead node: it stays in use.
    assert metrics[f'imgcache_tier_node_up{{node="{secondary.url}"}}'] == 1


async def test_a_refusal_relayed_by_the_tier_goes_to_glance_which_decides(
    glance: GlanceStandin, imgcache_factory: ImgcacheFactory, tier_nodes: TierFactory
) -> None:
    image, primary, secondary = await two_nodes_holding(glance, tier_nodes, 2 * MiB)
    for node in (primary, secondary):  # their Glance does not know this caller (stale cache)
        node.tokens.discard(TOKEN)
    imgcache = await tiered(imgcache_factory, [primary, secondary])
    status, _, body = await imgcache.get(image.id)
    assert status == 200 and sha512(body) == image.os_hash_value
    assert len(primary.requests) == 1 and not secondary.requests  # straight on to Glance
    assert data_bytes(glance, image.id) >= image.size
    metrics = await imgcache.metrics()
    assert metrics[f'imgcache_tier_failures_total{{kind="refused",node="{primary.url}"}}'] == 1
    assert metrics[f'imgcache_tier_node_up{{node="{primary.url}"}}'] == 1


async def test_a_wrong_sized_object_in_the_tier_is_not_used(
    glance: GlanceStandin, imgcache_factory: ImgcacheFactory, tier_nodes: TierFactory
) -> None:
    nodes = await tier_nodes(2)
    image = await glance.add_image(size=4 * MiB)
    primary, secondary = ranked(image.id, nodes)
    await primary.add_image(size=image.size - 100, image_id=image.id)  # truncated object
    await secondary.add_image(size=image.size, image_id=image.id)
    imgcache = await tiered(imgcache_factory, [primary, secondary])
    status, _, body = await imgcache.get(image.id)
    assert status == 200 and sha512(body) == image.os_hash_value
    assert data_bytes(secondary, image.id) == image.size
    metrics = await imgcache.metrics()
    # Refused on its Content-Length alone: none of its bytes were used.
    assert metrics[f'imgcache_source_bytes_total{{source="{primary.url}"}}'] == 0
    assert metrics[f'imgcache_tier_failures_total{{kind="bad_answer",node="{primary.url}"}}'] == 1
    # It was asked to purge the bad object (a stand-in knows no PURGE: counted as failed).
    async with asyncio.timeout(10):
        while not any(r.method == "PURGE" for r in primary.requests):
            await asyncio.sleep(0.02)
    assert [r.path for r in primary.requests if r.method == "PURGE"] == [
        f"/v2/images/{image.id}/file"]


async def test_a_corrupt_object_fails_its_fill_then_comes_straight_from_glance(
    glance: GlanceStandin, imgcache_factory: ImgcacheFactory, tier_nodes: TierFactory
) -> None:
    image, primary, secondary = await two_nodes_holding(glance, tier_nodes, 4 * MiB)
    primary.faults[image.id] = Fault(corrupt_at=3 * MiB)  # every read: the object is bad
    imgcache = await tiered(imgcache_factory, [primary, secondary])

    async def read() -> bytes:
        async with imgcache.session.get(imgcache.data_url(image.id),
                                        headers={"X-Auth-Token": TOKEN}) as response:
            return await response.read()

    results = await asyncio.gather(*(read() for _ in range(4)), return_exceptions=True)
    # Nobody got the corrupt bytes as a whole image: every transfer was cut.
    assert all(isinstance(r, aiohttp.ClientPayloadError) for r in results), results
    await imgcache.wait_for_metric('imgcache_fills_total{outcome="committed"}', 1)
    metrics = await imgcache.metrics()
    assert metrics['imgcache_fills_total{outcome="checksum_mismatch"}'] == 1
    assert metrics[f'imgcache_tier_failures_total{{kind="checksum",node="{primary.url}"}}'] == 1
    # The refill went straight to Glance, not to the secondary or the primary again.
    assert data_bytes(glance, image.id) >= image.size
    assert data_bytes(secondary, image.id) == 0
    assert len(data_requests(primary, image.id)) == 1
    assert metrics['imgcache_source_bytes_total{source="glance"}'] == image.size
    async with asyncio.timeout(10):
        while metrics['imgcache_tier_purges_total{outcome="failed"}'] < 1:
            await asyncio.sleep(0.02)
            metrics = await imgcache.metrics()
    assert any(r.method == "PURGE" for r in primary.requests)
    status, headers, body = await imgcache.get(image.id)
    assert status == 200 and headers["X-Cache-Status"] == "HIT"
    assert sha512(body) == image.os_hash_value


async def test_a_corrupt_glance_is_not_retried_without_a_tier(
    glance: GlanceStandin, imgcache_factory: ImgcacheFactory
) -> None:
    image = await glance.add_image(size=2 * MiB)
    glance.faults[image.id] = Fault(corrupt_at=MiB, times=1)
    imgcache = await imgcache_factory()
    with pytest.raises(aiohttp.ClientPayloadError):
        await imgcache.get(image.id)
    await imgcache.wait_for_metric('imgcache_fills_total{outcome="checksum_mismatch"}', 1)
    await asyncio.sleep(0.3)
    assert (await imgcache.metrics())["imgcache_fills_in_progress"] == 0
    assert len(data_requests(glance, image.id)) == 1  # today's behaviour: no refill


async def test_after_glance_fails_too_the_retry_starts_at_the_tier_again(
    glance: GlanceStandin, imgcache_factory: ImgcacheFactory, tier_nodes: TierFactory
) -> None:
    # A tier node answering 5xx (it cannot reach Glance), then Glance breaking as well: the
    # retry goes to the tier first again, so that a Glance coming back from an outage does
    # not get every compute node's fill at once.
    (node,) = await tier_nodes(1)
    image = await glance.add_image(size=4 * MiB)
    await holding([node], image)
    node.faults[image.id] = Fault(status=503, times=1)
    # Glance's first data GET is imgcache's one-byte download check; the second, the fill's
    # own, breaks after 1 KiB.
    glance.faults[image.id] = Fault(reset_at=1024, times=2)
    imgcache = await tiered(imgcache_factory, [node])
    status, _, body = await imgcache.get(image.id)
    assert status == 200 and sha512(body) == image.os_hash_value
    gets = [r for r in node.requests if r.method == "GET"]
    assert [r.status for r in gets] == [503, 206]
    assert gets[1].headers["Range"] == f"bytes=1024-{image.size - 1}"
    metrics = await imgcache.metrics()
    assert metrics['imgcache_source_bytes_total{source="glance"}'] == 1024
    assert metrics[f'imgcache_source_bytes_total{{source="{node.url}"}}'] == image.size - 1024
