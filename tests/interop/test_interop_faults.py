"""A real Glance under load and with a corrupted store, through imgcache: one data GET for a
crowd, and no corrupt image for anybody."""

from __future__ import annotations

import pathlib
from collections.abc import Callable

import pytest
from harness import ImageFile, Imgcache, MiB, checked, upload_image
from relay import Relay
from stack import Clients, Stack, User

pytestmark = pytest.mark.interop

CROWD = 16


def allowed(imgcache: Imgcache) -> float:
    """How many image-data GETs Glance has allowed so far (one per distinct token: identical
    questions asked at once share one answer)."""
    return imgcache.metric('imgcache_auth_checks_total{outcome="allowed"}')


def release_when_joined(relay: Relay, imgcache: Imgcache, clients: int) -> None:
    """Wait until the relay holds the fill and Glance has allowed ``clients`` GETs (each
    client has joined that one fill), then let Glance's bytes go on (also on a timeout)."""
    try:
        relay.wait_held(1, timeout=60)
        imgcache.wait_for(lambda: allowed(imgcache) >= clients, f"{clients} allowed GETs",
                          timeout=60)
    finally:
        relay.release()


def test_sixteen_clients_at_once_make_one_glance_download(
    stack: Stack, clients: Clients, imgcache: Imgcache, relay: Relay, alice: User,
    image_file: Callable[[int], ImageFile], tmp_path: pathlib.Path,
) -> None:
    assert stack.glance is not None
    src = image_file(32 * MiB)
    image_id = upload_image(clients, imgcache, alice, src, "faults")

    # Sixteen instances booting: a token each, as Nova passes on each user's own.
    tokens = [stack.token(alice, fresh=True) for _ in range(CROWD)]
    relay.hold()  # keep the fill in flight until the whole crowd has joined it
    crowd = clients.start("glanceclient", alice, imgcache.url, "download", image_id,
                          tmp_path / "crowd.raw", "--parallel", CROWD, tokens=tokens)
    release_when_joined(relay, imgcache, CROWD)
    run = checked(clients.finish(crowd), f"{CROWD} downloads")

    assert run.result == [{"ok": True, "bytes": src.size, "sha256": src.sha256}] * CROWD
    statuses = run.cache_statuses()
    assert sorted(statuses) == ["COALESCED"] * (CROWD - 1) + ["MISS"], statuses
    assert stack.glance.data_gets(image_id) == 1, "\n".join(stack.glance.access_lines())
    imgcache.wait_committed(1)
    assert imgcache.metric("imgcache_upstream_bytes_total") == src.size


def test_corrupted_glance_store_fails_every_client_and_caches_nothing(
    stack: Stack, clients: Clients, imgcache: Imgcache, relay: Relay, alice: User,
    image_file: Callable[[int], ImageFile], tmp_path: pathlib.Path,
) -> None:
    assert stack.glance is not None
    src = image_file(24 * MiB)
    image_id = upload_image(clients, imgcache, alice, src, "faults")
    # Rot on Glance's disk: same size, a few bytes changed in the middle.
    stored = stack.glance.state_dir / "images" / image_id
    assert stored.stat().st_size == src.size
    with stored.open("r+b") as fh:
        fh.seek(src.size // 2)
        rotten = bytes(b ^ 0xFF for b in fh.read(4096))
        fh.seek(src.size // 2)
        fh.write(rotten)

    tokens = [stack.token(alice, fresh=True) for _ in range(3)]
    relay.hold()  # everybody joins the one fill before Glance's bytes go on
    crowd = [
        clients.start("glanceclient", alice, imgcache.url, "download", image_id,
                      tmp_path / "gc.raw", "--parallel", 3, tokens=tokens),
        clients.start("sdk", alice, imgcache.url, "download", image_id, tmp_path / "sdk.raw"),
    ]
    release_when_joined(relay, imgcache, 4)  # glanceclient's 3 downloads and the sdk's
    runs = [clients.finish(proc) for proc in crowd]

    for run in runs:
        assert not run.ok, run
        for result in run.result:
            assert not result["ok"], result  # every client got an error, none an image
    outputs = ["gc.raw.0", "gc.raw.1", "gc.raw.2", "sdk.raw"]
    assert [name for name in outputs if (tmp_path / name).exists()] == []
    assert imgcache.metric('imgcache_fills_total{outcome="checksum_mismatch"}') >= 1
    assert imgcache.metric('imgcache_fills_total{outcome="committed"}') == 0
    assert imgcache.metric("imgcache_cache_entries") == 0
    assert imgcache.cached_files() == []

    # Nothing was cached: the next client is refused again, not served a bad copy.
    again = clients.run("glanceclient", alice, imgcache.url, "download", image_id,
                        tmp_path / "again.raw")
    assert not again.ok, again
    assert again.cache_statuses() == ["MISS"]
    assert imgcache.metric("imgcache_cache_entries") == 0
