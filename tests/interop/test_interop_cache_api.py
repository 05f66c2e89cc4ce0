"""Glance's own cache API on imgcache's listener, driven by the real command-line clients an
operator uses (``glance cache-*``, ``openstack cached image *``) against a real Keystone and
Glance: admins manage the node's cache, members are refused on every verb, queued images are
downloaded with the caller's token and so authorized by Glance."""

from __future__ import annotations

import json
import pathlib
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
from harness import DECISION_TTL, ImageFile, Imgcache, MiB, checked, upload_image
from oscli import Cli, CliRun
from processes import free_port
from relay import Relay
from stack import Clients, Stack, User, call

pytestmark = pytest.mark.interop

#: Slack for polling and the requests' own time on a busy 2-core machine.
SLACK = 3.0


@pytest.fixture
def cli(stack: Stack, imgcache: Imgcache) -> Iterator[Cli]:
    """The clients pointed at imgcache; every command and its answer printed at the end."""
    runner = Cli(stack, imgcache.url)
    try:
        yield runner
    finally:
        print(f"--- commands run:\n{runner.report()}")


def ok(run: CliRun) -> CliRun:
    """The command exited 0 and wrote nothing to stderr."""
    assert run.returncode == 0 and not run.stderr.strip(), run.report()
    return run


def listed(run: CliRun) -> dict[str, str]:
    """``{image_id: state}`` from a ``cache-list`` / ``cached image list`` table."""
    rows = {}
    for line in run.stdout.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 6 and cells[1] in ("cached", "queued"):
            rows[cells[0]] = cells[1]
    return rows


def cache_state(imgcache: Imgcache, token: str) -> dict:
    """``GET /v2/cache`` as JSON."""
    reply = call("GET", f"{imgcache.url}/v2/cache", headers={"X-Auth-Token": token})
    assert reply.status == 200, reply
    return reply.json()


def test_glance_cli_manages_the_node_cache(
    stack: Stack, clients: Clients, imgcache: Imgcache, relay: Relay, alice: User, cli: Cli,
    image_file: Callable[[int], ImageFile], tmp_path: pathlib.Path,
) -> None:
    admin = stack.admin
    first = upload_image(clients, imgcache, alice, image_file(8 * MiB), "cache-first")
    second = upload_image(clients, imgcache, alice, image_file(8 * MiB), "cache-second")
    empty = checked(clients.run("glanceclient", alice, imgcache.url, "create", "no-data"),
                    "create").result["id"]
    assert listed(ok(cli.glance(admin, "cache-list"))) == {}

    # Queued with the admin's token, downloaded at once, verified and cached.
    ok(cli.glance(admin, "cache-queue", first, second))
    imgcache.wait_committed(2)
    table = ok(cli.glance(admin, "cache-list"))
    assert listed(table) == {first: "cached", second: "cached"}
    assert str(8 * MiB) in table.stdout
    cached = {e["image_id"]: e for e in cache_state(imgcache, stack.token(admin))
              ["cached_images"]}
    assert cached[first]["size"] == 8 * MiB and cached[first]["hits"] == 0
    assert abs(cached[first]["last_modified"] - time.time()) < 120
    # The next boot of the image is a HIT: Glance sent its bytes once.
    boot = checked(clients.run("glanceclient", alice, imgcache.url, "download", first,
                               tmp_path / "boot.raw"), "download")
    assert boot.cache_statuses() == ["HIT"]
    assert stack.glance is not None and stack.glance.data_gets(first) == 1

    ok(cli.glance(admin, "cache-delete", first))
    assert listed(ok(cli.glance(admin, "cache-list"))) == {second: "cached"}
    assert len(imgcache.cached_files()) == 1

    # A queued image whose download is in flight shows as queued; clearing the queue
    # withdraws it, and it is not kept once its download ends.
    relay.hold()
    try:
        ok(cli.glance(admin, "cache-queue", first))
        relay.wait_held(1, timeout=60)
        assert listed(ok(cli.glance(admin, "cache-list"))) == {first: "queued",
                                                                second: "cached"}
        ok(cli.glance(admin, "cache-clear", "--target", "queue"))
        assert listed(ok(cli.glance(admin, "cache-list"))) == {second: "cached"}
    finally:
        relay.release()
    imgcache.wait_for(lambda: imgcache.metric(
        'imgcache_prefetches_total{outcome="withdrawn"}') == 1, "the withdrawn prefetch")
    assert listed(ok(cli.glance(admin, "cache-list"))) == {second: "cached"}

    ok(cli.glance(admin, "cache-clear", "--target", "cache"))
    assert listed(ok(cli.glance(admin, "cache-list"))) == {}
    ok(cli.glance(admin, "cache-queue", second))
    imgcache.wait_committed(4)
    ok(cli.glance(admin, "cache-clear"))  # both
    assert listed(ok(cli.glance(admin, "cache-list"))) == {}
    assert imgcache.cached_files() == []

    # Glance's own answers for what cannot be queued; glanceclient reports them on stderr.
    refused = cli.glance(admin, "cache-queue", empty)
    assert "Only images with status active" in refused.stderr, refused.report()
    unknown = str(uuid.uuid4())
    for verb in ("cache-queue", "cache-delete"):
        missing = cli.glance(admin, verb, unknown)
        assert "HTTPNotFound" in missing.stderr or "404" in missing.stderr, missing.report()
    bad_target = call("DELETE", f"{imgcache.url}/v2/cache", headers={
        "X-Auth-Token": stack.token(admin), "x-image-cache-clear-target": "everything"})
    assert bad_target.status == 400 and b"must be 'cache', 'queue'" in bad_target.body
    assert cache_state(imgcache, stack.token(admin)) == {"cached_images": [],
                                                         "queued_images": []}


def test_openstack_cli_manages_the_node_cache(
    stack: Stack, clients: Clients, imgcache: Imgcache, alice: User, cli: Cli,
    image_file: Callable[[int], ImageFile],
) -> None:
    admin = stack.admin
    first = upload_image(clients, imgcache, alice, image_file(4 * MiB), "osc-first")
    second = upload_image(clients, imgcache, alice, image_file(4 * MiB), "osc-second")
    assert listed(ok_osc(cli.openstack(admin, "cached", "image", "list"))) == {}
    ok_osc(cli.openstack(admin, "cached", "image", "queue", first, second))
    imgcache.wait_committed(2)
    assert listed(ok_osc(cli.openstack(admin, "cached", "image", "list"))) == {
        first: "cached", second: "cached"}
    ok_osc(cli.openstack(admin, "cached", "image", "delete", first))
    assert listed(ok_osc(cli.openstack(admin, "cached", "image", "list"))) == {
        second: "cached"}
    ok_osc(cli.openstack(admin, "cached", "image", "clear", "--queue"))
    assert listed(ok_osc(cli.openstack(admin, "cached", "image", "list"))) == {
        second: "cached"}
    ok_osc(cli.openstack(admin, "cached", "image", "clear", "--cache"))
    assert listed(ok_osc(cli.openstack(admin, "cached", "image", "list"))) == {}
    ok_osc(cli.openstack(admin, "cached", "image", "queue", first))
    imgcache.wait_committed(3)
    ok_osc(cli.openstack(admin, "cached", "image", "clear"))
    assert listed(ok_osc(cli.openstack(admin, "cached", "image", "list"))) == {}
    assert imgcache.cached_files() == []


def ok_osc(run: CliRun) -> CliRun:
    """The command exited 0; stderr may hold only openstacksdk's warning that it cannot
    discover microversions at an overridden endpoint (it prints it for Glance itself too)."""
    noise = "Cannot determine endpoint data for service image"
    assert run.returncode == 0, run.report()
    assert not run.stderr.replace(noise, "").strip(), run.report()
    return run


def test_member_token_refused_on_every_verb(
    stack: Stack, clients: Clients, imgcache: Imgcache, alice: User, cli: Cli,
    image_file: Callable[[int], ImageFile],
) -> None:
    admin = stack.admin
    image_id = upload_image(clients, imgcache, alice, image_file(4 * MiB), "members-own")
    ok(cli.glance(admin, "cache-queue", image_id))
    imgcache.wait_committed(1)
    before = cache_state(imgcache, stack.token(admin))

    listing = cli.glance(alice, "cache-list")
    assert listing.returncode == 1 and "needs the role admin" in listing.stderr
    assert image_id not in listing.stdout
    # glanceclient reports these refusals on stderr and exits 0, as it does against Glance.
    for verb, words in (("cache-queue", "not permitted to queue"),
                        ("cache-delete", "not permitted to delete"),
                        ("cache-clear", "not permitted to delete")):
        run = cli.glance(alice, verb, *((image_id,) if verb != "cache-clear" else ()))
        assert words in run.stderr, run.report()
    for args in (("list",), ("queue", image_id), ("delete", image_id), ("clear",)):
        run = cli.openstack(alice, "cached", "image", *args)
        assert run.returncode == 1, run.report()
        assert image_id not in run.stdout
    for method, path in (("GET", "/v2/cache"), ("PUT", f"/v2/cache/{image_id}"),
                         ("DELETE", f"/v2/cache/{image_id}"), ("DELETE", "/v2/cache"),
                         ("GET", f"/v2/cache/nodes/{image_id}"), ("POST", "/v2/cache/x")):
        reply = call(method, imgcache.url + path, headers={"X-Auth-Token": stack.token(alice)})
        assert reply.status == 403, (method, path, reply)
        assert image_id.encode() not in reply.body
    # Nothing changed: the image is still cached, nothing was queued or fetched.
    assert cache_state(imgcache, stack.token(admin)) == before
    assert imgcache.metric('imgcache_fills_total{outcome="committed"}') == 1
    assert stack.glance is not None and stack.glance.data_gets(image_id) == 1

    # No token, or one Keystone does not know: 401, naming Keystone as Glance does.
    for headers in ({}, {"X-Auth-Token": "gAAAAAB-not-a-token"}):
        reply = call("GET", f"{imgcache.url}/v2/cache", headers=headers)
        assert reply.status == 401, reply
        assert reply.headers["www-authenticate"] == f'Keystone uri="{stack.keystone.url}"'


def test_versions_document_offers_the_cache_api(stack: Stack, imgcache: Imgcache) -> None:
    assert stack.glance is not None
    for path in ("/versions", "/"):
        own = call("GET", stack.glance.url + path)
        through = call("GET", imgcache.url + path)
        assert through.status == own.status
        own_ids = [v["id"] for v in own.json()["versions"]]
        ids = [v["id"] for v in through.json()["versions"]]
        assert "v2.14" not in own_ids  # a Glance without its own cache lists no v2.14
        assert [i for i in ids if i != "v2.14"] == own_ids
        [entry] = [v for v in through.json()["versions"] if v["id"] == "v2.14"]
        assert entry["status"] == "SUPPORTED" and entry["links"]
        assert through.headers["content-length"] == str(len(through.body))
        json.loads(through.body)


def cache_operator(stack: Stack, project: User) -> User:
    """A new user, member of ``project``'s project with the ``cache_operator`` role as well.
    A new user, not a new role on an old one: each Keystone worker caches role assignments
    for a while, so a role granted to a user it has seen may not be in its next token."""
    admin_token = stack.token(stack.admin)
    roles = {r["name"]: r["id"] for r in stack.keystone.api(admin_token, "GET",
                                                             "/v3/roles")["roles"]}
    if "cache_operator" not in roles:
        roles["cache_operator"] = stack.keystone.api(admin_token, "POST", "/v3/roles", {
            "role": {"name": "cache_operator"}})["role"]["id"]
    user = User(f"operator-{uuid.uuid4().hex[:8]}", stack.PASSWORD, project.project,
                project_id=project.project_id)
    created = stack.keystone.api(admin_token, "POST", "/v3/users", {"user": {
        "name": user.name, "password": user.password, "domain_id": "default",
        "default_project_id": user.project_id}})["user"]
    user.user_id = created["id"]
    for role in ("member", "cache_operator"):
        stack.keystone.api(admin_token, "PUT", f"/v3/projects/{user.project_id}/users/"
                           f"{user.user_id}/roles/{roles[role]}")
    return user


def test_configured_role_and_glance_judges_the_queued_download(
    stack: Stack, clients: Clients, relay: Relay, alice: User, bob: User,
    image_file: Callable[[int], ImageFile], tmp_path: pathlib.Path,
) -> None:
    """A role of the operator's choosing, Keystone's URL given explicitly, and a queue
    request judged by Glance with the caller's own token: an operator of project beta may
    manage the cache but cannot cache alice's private image, which Glance does not show
    them."""
    stack.token(bob)  # bob's project id
    operator = cache_operator(stack, bob)
    server = Imgcache(relay.url, tmp_path / "cache", extra=(
        "--cache-api-roles", "admin,cache_operator", "--keystone-url", stack.keystone.url,
        "--decision-ttl", f"{DECISION_TTL}s"))
    cli = Cli(stack, server.url)
    try:
        hidden = upload_image(clients, server, alice, image_file(4 * MiB), "alice-private")
        own = upload_image(clients, server, operator, image_file(4 * MiB), "operator-own")
        ok(cli.glance(operator, "cache-list"))
        refused = cli.glance(operator, "cache-queue", hidden)
        assert "HTTPNotFound" in refused.stderr or "404" in refused.stderr, refused.report()
        ok(cli.glance(operator, "cache-queue", own))
        server.wait_committed(1)
        assert listed(ok(cli.glance(operator, "cache-list"))) == {own: "cached"}
        assert stack.glance is not None and stack.glance.data_gets(hidden) == 0
        # Members without the role are still refused.
        assert cli.glance(alice, "cache-list").returncode == 1
        assert cli.glance(bob, "cache-list").returncode == 1
    finally:
        print(f"--- commands run:\n{cli.report()}\n--- imgcache log:\n{server.stop()}")


def test_revoked_token_refused_after_the_ttl_and_keystone_down(
    stack: Stack, imgcache: Imgcache, relay: Relay, tmp_path: pathlib.Path,
) -> None:
    token = stack.token(stack.admin, fresh=True)
    assert call("GET", f"{imgcache.url}/v2/cache", headers={"X-Auth-Token": token}).status == 200
    stack.keystone.revoke(token)
    deadline = time.monotonic() + DECISION_TTL + SLACK
    while True:  # remembered for at most the TTL, then Keystone's "no" is final
        status = call("GET", f"{imgcache.url}/v2/cache", headers={"X-Auth-Token": token}).status
        if status == 401:
            break
        assert status == 200 and time.monotonic() < deadline, status
        time.sleep(0.2)
    assert call("GET", f"{imgcache.url}/v2/cache", headers={"X-Auth-Token": token}).status == 401

    nowhere = f"http://127.0.0.1:{free_port()}"
    server = Imgcache(relay.url, tmp_path / "cache-nowhere", extra=("--keystone-url", nowhere))
    try:
        reply = call("GET", f"{server.url}/v2/cache",
                     headers={"X-Auth-Token": stack.token(stack.admin)})
        assert reply.status == 503, reply
        message = reply.json()["error"]["message"]
        assert nowhere in message and "[cache_api] keystone_url" in message
    finally:
        log = server.stop()
    assert stack.token(stack.admin) not in log and token not in log
