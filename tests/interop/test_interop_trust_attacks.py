"""Attacks on the trust promises against real Keystone 30 + Glance 33 (tests/test_trust_attacks.py
plays them on the stand-in): one allowed user trying to crowd the still-valid starter's token
out of a fill, and the decision window of a deleted image."""

from __future__ import annotations

import concurrent.futures
import pathlib
import time
from collections.abc import Callable

import pytest
from harness import ImageFile, Imgcache, MiB, upload_image
from relay import Relay
from stack import Clients, Reply, Stack, User, call

from imgcache.credentials import MAX_KEPT_CALLERS

pytestmark = pytest.mark.interop


def _get(imgcache: Imgcache, image_id: str, headers: dict[str, str]) -> Reply | str:
    try:
        return call("GET", imgcache.data_url(image_id), headers=headers, timeout=60)
    except Exception as exc:  # a reset, IncompleteRead: any broken end of the download
        return f"broken: {exc!r}"


def test_one_user_revoking_its_padded_tokens_does_not_fail_the_owners_fill(
    stack: Stack, clients: Clients, relay: Relay, alice: User,
    image_file: Callable[[int], ImageFile], tmp_path: pathlib.Path,
) -> None:
    """The fill's first data GET is held at the relay until imgcache's read timeout makes it
    resume; by then the crowding user, which joined MAX_KEPT_CALLERS times with padded
    headers, has revoked its own token (a logout). The owner's download goes on whole."""
    src = image_file(16 * MiB)
    uploader = Imgcache(relay.url, tmp_path / "upload-cache", extra=())
    try:
        image_id = upload_image(clients, uploader, alice, src, "crowded-out")
    finally:
        uploader.stop()
    imgcache = Imgcache(relay.url, tmp_path / "cache",
                        extra=("--read-timeout", "5s", "--retry-backoff", "0.1s",
                               "--log-level", "info"))
    owner = stack.token(alice, fresh=True)
    crowder = stack.token(alice, fresh=True)  # another session: the same user, or a colleague
    pool = concurrent.futures.ThreadPoolExecutor(MAX_KEPT_CALLERS + 1)
    try:
        relay.hold()
        starter = pool.submit(_get, imgcache, image_id, {"X-Auth-Token": owner})
        relay.wait_held(1, timeout=60)
        joiners = [pool.submit(_get, imgcache, image_id,
                               {"X-Auth-Token": crowder, "X-Pad": str(i)})
                   for i in range(MAX_KEPT_CALLERS)]
        time.sleep(2.0)  # every joiner asked Glance and joined the held fill
        stack.keystone.revoke(crowder)
        time.sleep(6.0)  # the read timeout breaks the held GET; the fill resumes
        relay.release()
        answer = starter.result(timeout=120)
        for joiner in joiners:
            joiner.result(timeout=120)
    finally:
        relay.release()
        pool.shutdown(wait=False)
        print(f"--- imgcache log:\n{imgcache.stop()}")
    assert isinstance(answer, Reply), answer
    assert answer.status == 200 and len(answer.body) == src.size, answer.status


def test_a_deleted_image_is_refused_at_once_to_new_callers_and_after_the_ttl_to_remembered(
    stack: Stack, clients: Clients, relay: Relay, alice: User,
    image_file: Callable[[int], ImageFile], tmp_path: pathlib.Path,
) -> None:
    """Real Glance answers 404 for a deleted image (never a status "deleted"), as for an
    image a token may not see: a new caller gets it at once, a token whose "allowed" is
    remembered at most decision_ttl later (README: the decision window)."""
    assert stack.glance is not None
    imgcache = Imgcache(relay.url, tmp_path / "cache", extra=("--decision-ttl", "3s"))
    try:
        src = image_file(4 * MiB)
        image_id = upload_image(clients, imgcache, alice, src, "deleted-later")
        remembered = stack.token(alice, fresh=True)
        assert imgcache.get(image_id, remembered).status == 200
        imgcache.wait_committed(1)
        assert imgcache.get(image_id, remembered).headers["x-cache-status"] == "HIT"
        deleted = call("DELETE", f"{stack.glance.url}/v2/images/{image_id}",
                       headers={"X-Auth-Token": stack.token(alice)})
        assert deleted.status == 204, deleted.status
        assert imgcache.get(image_id, stack.token(alice, fresh=True)).status == 404
        time.sleep(3.1)
        after = imgcache.get(image_id, remembered)
        assert after.status == 404, (after.status, after.headers.get("x-cache-status"))
    finally:
        imgcache.stop()
