"""The fleet scenario, small: 4 compute nodes (each its own imgcache and 2 booting clients),
2 Traffic Server tier nodes and an https Glance stand-in, in network namespaces on shaped
links (10 Gbit/s nodes and tier, 400 Mbit/s Glance). One cold image is booted on every node
at once, without the tier, through it, and through it with the image's tier node killed
(kill -9) once Glance has sent half of it. bench/fleet/ runs the same with 16 nodes and
reports times; here only bytes and outcomes are checked (times belong to benchmarks)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fleetsim import Fleet
from netsim import Rack, netns_usable
from tierengines import engine_available

MiB = 1 << 20
GBIT = 1_000_000_000
SIZE = 32 * MiB
NODES = 4
#: Headers and TCP/TLS framing on top of the image bytes Glance sends, at most.
OVERHEAD = 1.05


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    usable, why = netns_usable("flt")
    if not usable:
        pytest.skip(f"network namespaces cannot be built here: {why}")
    assert engine_available("trafficserver"), "Traffic Server missing: run `make system-deps`"
    rack = Rack("flt", nodes=NODES, tiers=2, node_rate=10 * GBIT, tier_rate=10 * GBIT,
                glance_rate=400_000_000)
    fleet = Fleet(rack, engine="trafficserver", image_size=SIZE, images=3,
                  clients_per_node=2)
    fleet.start()
    yield fleet
    fleet.close()


def source_bytes(storm_metrics: dict[str, float], url: str) -> float:
    return storm_metrics.get(f'imgcache_source_bytes_total{{source="{url}"}}', 0.0)


def test_without_the_tier_every_node_fetches_the_image_from_glance(fleet: Fleet) -> None:
    fleet.start_imgcaches(with_tier=False)
    storm = fleet.storm("direct", fleet.images[0])
    assert not storm.failed
    assert NODES * SIZE <= storm.glance_egress <= NODES * SIZE * OVERHEAD
    assert storm.summed('imgcache_fills_total{outcome="committed"}') == NODES


def test_through_the_tier_glance_sends_the_image_once(fleet: Fleet) -> None:
    fleet.start_imgcaches(with_tier=True)
    image = fleet.images[1]
    storm = fleet.storm("tier", image)
    assert not storm.failed
    assert SIZE <= storm.glance_egress <= SIZE * OVERHEAD
    primary = fleet.rack.tier_urls[fleet.primary(image)]
    for metrics in storm.metrics:  # every node got every byte from the image's tier node
        assert source_bytes(metrics, primary) == SIZE
        assert metrics['imgcache_fills_total{outcome="committed"}'] == 1
        assert metrics["imgcache_checksum_failures_total"] == 0
    # The other tier node was not involved.
    other = 1 - fleet.primary(image)
    assert storm.tier_egress[other] < MiB
    assert storm.tier_egress[fleet.primary(image)] >= NODES * SIZE


def test_a_tier_node_killed_mid_way_fails_no_client(fleet: Fleet) -> None:
    fleet.start_imgcaches(with_tier=True)
    image = fleet.images[2]
    storm = fleet.storm("tier, node killed", image, kill_primary=True)
    assert storm.killed == fleet.rack.tier_urls[fleet.primary(image)]
    assert not storm.failed, storm.failed
    # Half the image through the killed node, then the whole of it once through the other
    # (a resume by Range there fetches the whole image from Glance, once for every node).
    assert SIZE * 1.4 <= storm.glance_egress <= SIZE * 2 * OVERHEAD
    secondary = fleet.rack.tier_urls[1 - fleet.primary(image)]
    resumed = sum(1 for m in storm.metrics if source_bytes(m, secondary) > 0)
    assert resumed == NODES
    assert storm.summed('imgcache_fill_resumes_total{how="range"}') >= NODES
    assert storm.summed('imgcache_source_bytes_total{source="glance"}') == 0
    assert storm.summed('imgcache_fills_total{outcome="committed"}') == NODES
