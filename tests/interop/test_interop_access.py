"""Glance, behind a real Keystone, decides who reads an image, also when imgcache holds it:
another project's private image, sharing, token revocation and deactivation."""

from __future__ import annotations

import pathlib
import time
from collections.abc import Callable

import pytest
from harness import DECISION_TTL, ImageFile, Imgcache, MiB, checked, upload_image
from relay import Relay
from stack import GLANCE_TOKEN_CACHE_TIME, Clients, Reply, Stack, User, call

pytestmark = pytest.mark.interop

#: Slack for one round of polling and the requests' own time on a busy 2-core machine.
SLACK = 3.0


def assert_no_image_bytes(reply: Reply, src: ImageFile) -> None:
    """The answer carries none of the image: a short error body."""
    assert len(reply.body) < 4096 and src.head[:64] not in reply.body, reply.body[:200]


def assert_refused(imgcache: Imgcache, user_token: str, image_id: str, src: ImageFile,
                   stage: str) -> None:
    """Metadata and data of the image are both refused to this token, as Glance refuses
    another project's private image: 404, and not one byte of it."""
    denied = imgcache.metric('imgcache_requests_total{result="denied"}')
    meta = call("GET", f"{imgcache.url}/v2/images/{image_id}",
                headers={"X-Auth-Token": user_token})
    assert meta.status == 404, f"{stage}: metadata answered {meta.status}"
    data = imgcache.get(image_id, user_token)
    assert data.status == 404, f"{stage}: data answered {data.status} {data.headers}"
    assert "x-cache-status" not in data.headers, data.headers
    assert_no_image_bytes(data, src)
    assert imgcache.metric('imgcache_requests_total{result="denied"}') == denied + 1


def test_private_image_refused_to_another_project_at_every_stage(
    stack: Stack, clients: Clients, imgcache: Imgcache, relay: Relay, alice: User, bob: User,
    image_file: Callable[[int], ImageFile], tmp_path: pathlib.Path,
) -> None:
    src = image_file(24 * MiB)
    bob_token = stack.token(bob)
    image_id = checked(clients.run("glanceclient", alice, imgcache.url, "create", "private"),
                       "create").result["id"]
    assert_refused(imgcache, bob_token, image_id, src, "queued")

    checked(clients.run("glanceclient", alice, imgcache.url, "upload", image_id, src.path),
            "upload")
    assert_refused(imgcache, bob_token, image_id, src, "active, not cached")

    relay.hold()
    download = clients.start("glanceclient", alice, imgcache.url, "download", image_id,
                             tmp_path / "alice.raw")
    try:
        relay.wait_held(1, timeout=60)
        assert imgcache.metric("imgcache_fills_in_progress") == 1
        assert_refused(imgcache, bob_token, image_id, src, "in flight")
        assert imgcache.metric("imgcache_fills_in_progress") == 1  # bob joined nothing
    finally:
        relay.release()
    alice_run = checked(clients.finish(download), "alice's download")
    assert alice_run.result == [{"ok": True, "bytes": src.size, "sha256": src.sha256}]
    assert alice_run.cache_statuses() == ["MISS"]

    imgcache.wait_committed(1)
    assert_refused(imgcache, bob_token, image_id, src, "cached")
    # The same through python-glanceclient, and bob's image list does not show it.
    bob_run = clients.run("glanceclient", bob, imgcache.url, "download", image_id,
                          tmp_path / "bob.raw")
    assert not bob_run.ok and bob_run.status == 404, bob_run
    assert not (tmp_path / "bob.raw").exists()
    assert image_id not in checked(clients.run("glanceclient", bob, imgcache.url, "list"),
                                   "bob's list").result
    assert stack.glance is not None and stack.glance.data_gets(image_id) == 1


def test_shared_image_is_served_to_the_member_from_the_cache(
    stack: Stack, clients: Clients, imgcache: Imgcache, alice: User, bob: User,
    image_file: Callable[[int], ImageFile], tmp_path: pathlib.Path,
) -> None:
    src = image_file(16 * MiB)
    image_id = upload_image(clients, imgcache, alice, src, "to-share")
    first = checked(clients.run("glanceclient", alice, imgcache.url, "download", image_id,
                                tmp_path / "alice.raw"), "alice's download")
    assert first.cache_statuses() == ["MISS"]
    imgcache.wait_committed(1)
    assert_refused(imgcache, stack.token(bob), image_id, src, "cached, not shared")

    checked(clients.run("glanceclient", alice, imgcache.url, "share", image_id,
                        bob.project_id), "share")
    checked(clients.run("glanceclient", bob, imgcache.url, "accept", image_id,
                        bob.project_id), "accept")
    assert image_id in checked(clients.run("glanceclient", bob, imgcache.url, "list"),
                               "bob's list").result

    bob_run = checked(clients.run("glanceclient", bob, imgcache.url, "download", image_id,
                                  tmp_path / "bob.raw"), "bob's download")
    assert bob_run.result == [{"ok": True, "bytes": src.size, "sha256": src.sha256}]
    assert bob_run.cache_statuses() == ["HIT"]
    assert stack.glance is not None and stack.glance.data_gets(image_id) == 1


def poll_until_refused(imgcache: Imgcache, image_id: str, token: str,
                       timeout: float) -> tuple[Reply, float]:
    """Download through imgcache until it stops answering 200; that answer and when."""
    deadline = time.monotonic() + timeout
    while True:
        reply = imgcache.get(image_id, token)
        if reply.status != 200:
            return reply, time.monotonic()
        if time.monotonic() > deadline:
            status = reply.headers.get("x-cache-status")
            pytest.fail(f"still served ({status}) {timeout} s later")
        time.sleep(0.1)


def test_revoked_token_stops_getting_bytes_within_the_decision_ttl(
    stack: Stack, clients: Clients, imgcache: Imgcache, alice: User,
    image_file: Callable[[int], ImageFile],
) -> None:
    assert stack.glance is not None
    src = image_file(8 * MiB)
    image_id = upload_image(clients, imgcache, alice, src, "revocation")
    token = stack.token(alice, fresh=True)
    assert imgcache.get(image_id, token).headers["x-cache-status"] == "MISS"
    imgcache.wait_committed(1)
    hit = imgcache.get(image_id, token)
    assert (hit.status, hit.headers["x-cache-status"]) == (200, "HIT")

    stack.keystone.revoke(token)
    revoked = time.monotonic()
    # Glance forgets the token within its token_cache_time, imgcache within its decision TTL.
    bound = GLANCE_TOKEN_CACHE_TIME + DECISION_TTL
    reply, refused = poll_until_refused(imgcache, image_id, token, bound + SLACK)
    assert reply.status == 401, (reply.status, reply.body[:300])
    assert reply.headers["www-authenticate"].startswith("Keystone uri=")
    assert_no_image_bytes(reply, src)
    print(f"revoked token refused {refused - revoked:.2f} s after the revocation")
    assert refused - revoked <= bound + SLACK
    # Refusals are never remembered as allowed: it stays refused, and Glance agrees.
    assert imgcache.get(image_id, token).status == 401
    assert call("GET", f"{stack.glance.url}/v2/images/{image_id}",
                headers={"X-Auth-Token": token}).status == 401
    # The owner's other token still gets the image from the cache.
    assert imgcache.get(image_id, stack.token(alice)).headers["x-cache-status"] == "HIT"


def test_deactivated_image_is_not_served_from_the_cache_to_non_admins(
    stack: Stack, clients: Clients, imgcache: Imgcache, alice: User,
    image_file: Callable[[int], ImageFile], tmp_path: pathlib.Path,
) -> None:
    assert stack.glance is not None
    src = image_file(8 * MiB)
    image_id = upload_image(clients, imgcache, alice, src, "deactivation")
    token, admin = stack.token(alice), stack.token(stack.admin)
    assert imgcache.get(image_id, token).headers["x-cache-status"] == "MISS"
    imgcache.wait_committed(1)
    assert imgcache.get(image_id, token).headers["x-cache-status"] == "HIT"

    action = f"{imgcache.url}/v2/images/{image_id}/actions"
    deactivated = call("POST", f"{action}/deactivate", headers={"X-Auth-Token": admin})
    assert deactivated.status == 204, deactivated
    changed = time.monotonic()
    reply, refused = poll_until_refused(imgcache, image_id, token, DECISION_TTL + SLACK)
    assert reply.status == 403, (reply.status, reply.body[:300])
    print(f"deactivated image refused {refused - changed:.2f} s after the deactivation")
    assert refused - changed <= DECISION_TTL + SLACK
    assert_no_image_bytes(reply, src)
    alice_run = clients.run("glanceclient", alice, imgcache.url, "download", image_id,
                            tmp_path / "alice.raw")
    assert not alice_run.ok and alice_run.status == 403, alice_run

    # An admin still gets it, from Glance (imgcache passes a non-active image through).
    admin_reply = imgcache.get(image_id, admin)
    assert admin_reply.status == 200
    assert admin_reply.headers["x-cache-status"] == "BYPASS"
    assert admin_reply.body == src.path.read_bytes()

    # Reactivated, it is the owner's again (cached anew: imgcache dropped the deactivated copy).
    reactivated = call("POST", f"{action}/reactivate", headers={"X-Auth-Token": admin})
    assert reactivated.status == 204, reactivated
    again = imgcache.get(image_id, token)
    assert again.status == 200
    assert again.body == src.path.read_bytes()
