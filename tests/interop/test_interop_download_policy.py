"""Glance's download policy, not its get_image policy, decides who reads an image through
imgcache: a project reader (Glance's default policy lets her see the project's images, not
download them) and a download rule restricted by an image property (members see the
image, only admins download it) are refused at every stage, in flight beside allowed
callers who get the whole verified image, cached, by range, and by prefetch and pin."""

from __future__ import annotations

import json
import pathlib
import subprocess
from collections.abc import Callable

import pytest
from harness import ImageFile, Imgcache, MiB, checked, upload_image
from processes import IMGCACHE
from relay import Relay
from stack import RESTRICTED_PROPERTY, Clients, Reply, Stack, User, call

pytestmark = pytest.mark.interop


def assert_download_refused(reply: Reply, src: ImageFile, stage: str) -> None:
    """Glance's 403 for the download, as Glance sent it: no cache status, no image byte."""
    assert reply.status == 403, f"{stage}: answered {reply.status} {reply.body[:200]!r}"
    assert "x-cache-status" not in reply.headers, (stage, reply.headers)
    assert len(reply.body) < 4096 and src.head[:64] not in reply.body, stage


def refused_everywhere(imgcache: Imgcache, token: str, image_id: str, src: ImageFile,
                       stage: str) -> None:
    """The metadata is this caller's to see; the data, whole or a range, is not."""
    meta = call("GET", f"{imgcache.url}/v2/images/{image_id}",
                headers={"X-Auth-Token": token})
    assert meta.status == 200, f"{stage}: metadata answered {meta.status}"
    assert_download_refused(imgcache.get(image_id, token), src, stage)
    ranged = call("GET", imgcache.data_url(image_id),
                  headers={"X-Auth-Token": token, "Range": "bytes=0-1023"})
    assert_download_refused(ranged, src, f"{stage}, range")


def ctl(imgcache: Imgcache, *args: str) -> dict:
    """Run an imgcache management command against the server; its JSON answer."""
    done = subprocess.run([IMGCACHE, *args, "--socket", str(imgcache.admin_socket), "--json"],
                          capture_output=True, text=True, timeout=120, check=False)
    return json.loads(done.stdout)


def in_flight_beside(imgcache: Imgcache, relay: Relay, clients: Clients, allowed: User,
                     image_id: str, out: pathlib.Path,
                     refused: Callable[[str], None]) -> None:
    """Hold a fill started by ``allowed`` in flight, run ``refused`` meanwhile; the allowed
    caller then gets the whole image, a MISS."""
    relay.hold()
    download = clients.start("glanceclient", allowed, imgcache.url, "download", image_id, out)
    try:
        relay.wait_held(1, timeout=60)
        assert imgcache.metric("imgcache_fills_in_progress") == 1
        refused("in flight")
        assert imgcache.metric("imgcache_fills_in_progress") == 1  # joined nothing
    finally:
        relay.release()
    run = checked(clients.finish(download), f"{allowed.name}'s download")
    assert run.result[0]["ok"] and run.cache_statuses() == ["MISS"]


def test_a_project_reader_sees_the_image_but_never_downloads_it(
    stack: Stack, clients: Clients, imgcache: Imgcache, relay: Relay, alice: User,
    image_file: Callable[[int], ImageFile], tmp_path: pathlib.Path,
) -> None:
    assert stack.glance is not None
    carol = stack.carol
    src = image_file(16 * MiB)
    image_id = upload_image(clients, imgcache, alice, src, "reader-refused")
    carol_token = stack.token(carol)
    # Glance itself: carol may see it, not download it.
    assert call("GET", f"{stack.glance.url}/v2/images/{image_id}/file",
                headers={"X-Auth-Token": carol_token}).status == 403

    refused_everywhere(imgcache, carol_token, image_id, src, "cold")
    assert stack.glance.data_gets(image_id) == 0  # carol started no fill

    def refused(stage: str) -> None:
        refused_everywhere(imgcache, carol_token, image_id, src, stage)

    in_flight_beside(imgcache, relay, clients, alice, image_id, tmp_path / "alice.raw",
                     refused)
    imgcache.wait_committed(1)
    refused_everywhere(imgcache, carol_token, image_id, src, "cached")
    carol_run = clients.run("glanceclient", carol, imgcache.url, "download", image_id,
                            tmp_path / "carol.raw")
    assert not carol_run.ok and carol_run.status == 403, carol_run
    assert imgcache.get(image_id, stack.token(alice)).headers["x-cache-status"] == "HIT"
    assert stack.glance.data_gets(image_id) == 1


def test_a_reader_cannot_prefetch_or_pin_an_image(
    stack: Stack, clients: Clients, imgcache: Imgcache, alice: User,
    image_file: Callable[[int], ImageFile],
) -> None:
    src = image_file(4 * MiB)
    image_id = upload_image(clients, imgcache, alice, src, "reader-prefetch")
    carol_token = stack.token(stack.carol)
    for command in ("prefetch", "pin"):
        answer = ctl(imgcache, command, image_id, "--token", carol_token, "--wait")
        [job] = answer["jobs"]
        assert job["state"] == "failed" and "(403)" in job["error"], (command, job)
    assert ctl(imgcache, "list")["entries"] == []
    assert imgcache.metric('imgcache_prefetches_total{outcome="failed"}') == 2
    # The member's prefetch works, and carol is still refused the cached copy.
    answer = ctl(imgcache, "prefetch", image_id, "--token", stack.token(alice), "--wait")
    assert answer["jobs"][0]["state"] == "cached", answer
    assert_download_refused(imgcache.get(image_id, carol_token), src, "prefetched")


def test_a_download_rule_restricted_by_an_image_property_is_obeyed(
    stack: Stack, clients: Clients, imgcache: Imgcache, relay: Relay, alice: User,
    image_file: Callable[[int], ImageFile], tmp_path: pathlib.Path,
) -> None:
    assert stack.glance is not None
    src = image_file(16 * MiB)
    image_id = upload_image(clients, imgcache, alice, src, "restricted")
    alice_token, admin = stack.token(alice), stack.token(stack.admin)
    patched = call("PATCH", f"{stack.glance.url}/v2/images/{image_id}",
                   body=json.dumps([{"op": "add", "path": f"/{RESTRICTED_PROPERTY}",
                                     "value": "yes"}]).encode(),
                   headers={"X-Auth-Token": alice_token,
                            "Content-Type": "application/openstack-images-v2.1-json-patch"})
    assert patched.status == 200, patched
    assert call("GET", f"{stack.glance.url}/v2/images/{image_id}/file",
                headers={"X-Auth-Token": alice_token}).status == 403

    refused_everywhere(imgcache, alice_token, image_id, src, "cold")

    def refused(stage: str) -> None:
        refused_everywhere(imgcache, alice_token, image_id, src, stage)

    in_flight_beside(imgcache, relay, clients, stack.admin, image_id,
                     tmp_path / "admin.raw", refused)
    imgcache.wait_committed(1)
    refused_everywhere(imgcache, alice_token, image_id, src, "cached")
    hit = imgcache.get(image_id, admin)
    assert (hit.status, hit.headers["x-cache-status"]) == (200, "HIT")
    assert hit.body == src.path.read_bytes()
