"""python-glanceclient and openstacksdk, authenticated by a real Keystone, do a whole image
life cycle through imgcache in front of a real Glance: create, upload (streamed through),
list, show, download twice (the clients verify the hash), the second time from the cache."""

from __future__ import annotations

import pathlib
from collections.abc import Callable

import pytest
from harness import ImageFile, Imgcache, MiB, checked
from stack import ClientRun, Clients, Stack, User

pytestmark = pytest.mark.interop


@pytest.mark.parametrize("client", ["glanceclient", "sdk"])
def test_image_life_cycle_through_imgcache(
    client: str,
    stack: Stack,
    clients: Clients,
    imgcache: Imgcache,
    alice: User,
    image_file: Callable[[int], ImageFile],
    tmp_path: pathlib.Path,
) -> None:
    assert stack.glance is not None
    src = image_file(64 * MiB)
    rss_at_start = imgcache.peak_rss()

    def run(*args: object) -> ClientRun:
        done = checked(clients.run(client, alice, imgcache.url, *args), f"{client} {args[0]}")
        # Every call went to Keystone or to imgcache, none straight to Glance.
        for call in done.http:
            assert call["url"].startswith((imgcache.url, stack.keystone.url)), call
        return done

    created = run("create", f"{client}-life-cycle").result
    image_id = created["id"]
    assert created["status"] == "queued"

    uploaded = run("upload", image_id, src.path).result
    assert uploaded["status"] == "active"
    assert uploaded["size"] == src.size
    assert (uploaded["os_hash_algo"], uploaded["os_hash_value"]) == ("sha512", src.sha512)
    # The upload was streamed through, not buffered: imgcache's peak memory barely moved.
    assert imgcache.peak_rss() - rss_at_start < 32 * MiB

    assert image_id in run("list").result
    shown = run("show", image_id).result
    assert shown == uploaded
    assert shown["visibility"] == "private"
    assert shown["owner"] == alice.project_id

    first = run("download", image_id, tmp_path / "first.raw")
    assert first.result == [{"ok": True, "bytes": src.size, "sha256": src.sha256}]
    assert first.cache_statuses() == ["MISS"]
    imgcache.wait_committed(1)
    second = run("download", image_id, tmp_path / "second.raw")
    assert second.result == [{"ok": True, "bytes": src.size, "sha256": src.sha256}]
    assert second.cache_statuses() == ["HIT"]

    assert stack.glance.data_gets(image_id) == 1, "\n".join(stack.glance.access_lines())
    assert imgcache.metric('imgcache_fills_total{outcome="committed"}') == 1
    assert imgcache.metric('imgcache_verifications_total{method="os_hash"}') == 1
    assert imgcache.metric('imgcache_requests_total{result="hit"}') == 1
