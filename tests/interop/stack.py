"""A real OpenStack on loopback for the interop suite: Keystone (sqlite, fernet tokens) and
Glance (keystone auth, file store), both under gunicorn, from the venv that
tests/glance/setup-venv.sh builds.

Standard library only: the tests run in the project's venv; the clients (python-glanceclient,
openstacksdk) run in the OpenStack venv as subprocesses (see ``Clients`` and osclient.py).
Everything here blocks; use it from synchronous fixtures.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import pathlib
import subprocess
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from openstack_venv import GunicornApp, clean_env, glance_venv, run_manage, write_ini
from processes import free_port, stop_process
from realglance import RealGlance

OSCLIENT_PY = pathlib.Path(__file__).with_name("osclient.py")
DOMAIN = "Default"
REGION = "RegionOne"
#: How long keystonemiddleware in Glance trusts a validated token. Its default (300 s) would hide
#: a revocation from Glance, and so from imgcache, for five minutes.
GLANCE_TOKEN_CACHE_TIME = 1

KEYSTONE_CONF = """\
[DEFAULT]
log_file = {state}/keystone.log
[database]
connection = sqlite:///{state}/keystone.sqlite
[token]
provider = fernet
# Token validations and revocation events are read from the database every time, so that every
# worker sees a revocation at once; the rest is cached in each worker's memory (without it one
# validation makes ~60 sqlite queries and takes ~0.4 s here).
caching = false
[revoke]
caching = false
[catalog]
caching = false
[cache]
enabled = true
backend = dogpile.cache.memory
[fernet_tokens]
key_repository = {state}/fernet-keys
[fernet_receipts]
key_repository = {state}/fernet-receipts
[credential]
key_repository = {state}/credential-keys
[identity]
password_hash_rounds = 4
"""

#: Glance's default download_image rule (glance/policies/base.py), restricted by an image
#: property as operators do: an image with ``restricted=yes`` is downloaded by admins only,
#: though its project's members still see it (get_image is unchanged).
RESTRICTED_PROPERTY = "restricted"
DOWNLOAD_POLICY = f"""\
"download_image": "rule:context_is_admin or ((role:member and (project_id:%(project_id)s or \
project_id:%(member_id)s or 'community':%(visibility)s or 'public':%(visibility)s or \
'shared':%(visibility)s)) and not 'yes':%({RESTRICTED_PROPERTY})s)"
"""

# Keystone parses the process's command line when it configures itself: under gunicorn that is
# gunicorn's, and its workers die with "unrecognized arguments" unless argv is cleared first.
KEYSTONE_WSGI = """\
import sys

sys.argv = sys.argv[:1]
from keystone.wsgi.api import application  # noqa: E402
"""


@dataclass(frozen=True)
class Reply:
    """An HTTP answer, read whole."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        """The body as JSON."""
        return json.loads(self.body)


def call(
    method: str,
    url: str,
    body: Any = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 120,
) -> Reply:
    """Send one HTTP request (a dict body is sent as JSON) and read the whole answer."""
    parts = urllib.parse.urlsplit(url)
    all_headers = dict(headers or {})
    if isinstance(body, dict):
        body = json.dumps(body).encode()
        all_headers.setdefault("Content-Type", "application/json")
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request(method, path or "/", body=body, headers=all_headers)
        resp = conn.getresponse()
        data = resp.read()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
    finally:
        conn.close()


def expect(reply: Reply, *statuses: int, what: str) -> Reply:
    """Return ``reply`` if its status is one of ``statuses``; raise RuntimeError otherwise."""
    if reply.status not in statuses:
        raise RuntimeError(f"{what}: HTTP {reply.status}: {reply.body[:500]!r}")
    return reply


def fernet_key_repository(path: pathlib.Path) -> None:
    """A key repository as ``keystone-manage fernet_setup`` makes it (a staged key ``0`` and a
    primary ``1``), without paying for three more keystone-manage runs."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    for name in ("0", "1"):
        key = path / name
        key.write_bytes(base64.urlsafe_b64encode(os.urandom(32)))
        key.chmod(0o600)


class Keystone(GunicornApp):
    """A real Keystone (sqlite, fernet tokens) under gunicorn on loopback, bootstrapped with
    an ``admin`` user in an ``admin`` project."""

    def __init__(self, state_dir: pathlib.Path, venv: pathlib.Path, admin_password: str) -> None:
        self.keystone_log = state_dir / "keystone.log"
        super().__init__(state_dir, venv, self.keystone_log)
        self.admin_password = admin_password
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def _manage(self, conf: pathlib.Path, *args: str, timeout: float) -> None:
        run_manage(
            [self.venv / "bin" / "keystone-manage", "--config-file", conf, *args],
            env=clean_env(self.venv),
            timeout=timeout,
            what=f"keystone-manage {args[0]}",
        )

    def start(self, timeout: float = 120) -> None:
        """Configure, migrate, create the key repositories, bootstrap and start gunicorn;
        return once Keystone answers."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        for repository in ("fernet-keys", "fernet-receipts", "credential-keys"):
            fernet_key_repository(self.state_dir / repository)
        conf = self.state_dir / "keystone.conf"
        write_ini(conf, KEYSTONE_CONF.format(state=self.state_dir), {})
        (self.state_dir / "keystone_wsgi.py").write_text(KEYSTONE_WSGI)
        self._manage(conf, "db_sync", timeout=timeout)
        # fmt: off
        self._manage(
            conf, "bootstrap",
            "--bootstrap-password", self.admin_password,
            "--bootstrap-admin-url", f"{self.url}/v3",
            "--bootstrap-public-url", f"{self.url}/v3",
            "--bootstrap-internal-url", f"{self.url}/v3",
            "--bootstrap-region-id", REGION,
            timeout=timeout,
        )
        # fmt: on
        self._serve(
            "keystone_wsgi:application",
            env=clean_env(self.venv, OS_KEYSTONE_CONFIG_DIR=str(self.state_dir)),
            health_path="/v3",
            timeout=timeout,
            what="keystone",
            workers=2,
            port=self.port,
            preload=True,  # import keystone once, not once per worker
        )

    def token(self, user: str, password: str, project: str) -> tuple[str, dict[str, Any]]:
        """A project-scoped token for a user (password method) and its body."""
        body = {
            "auth": {
                "identity": {
                    "methods": ["password"],
                    "password": {
                        "user": {"name": user, "domain": {"name": DOMAIN}, "password": password}
                    },
                },
                "scope": {"project": {"name": project, "domain": {"name": DOMAIN}}},
            }
        }
        reply = expect(
            call("POST", f"{self.url}/v3/auth/tokens", body), 201, what=f"token for {user}"
        )
        return reply.headers["x-subject-token"], reply.json()["token"]

    def api(self, token: str, method: str, path: str, body: Any = None,
            ok: Sequence[int] = (200, 201, 204)) -> Any:
        """Call Keystone's API with a token; return the JSON answer (None when empty)."""
        reply = call(method, f"{self.url}{path}", body, {"X-Auth-Token": token})
        expect(reply, *ok, what=f"keystone {method} {path}")
        return reply.json() if reply.body else None

    def revoke(self, token: str) -> None:
        """Revoke a token (DELETE /v3/auth/tokens by its own user, as a logout does)."""
        reply = call("DELETE", f"{self.url}/v3/auth/tokens",
                     headers={"X-Auth-Token": token, "X-Subject-Token": token})
        expect(reply, 204, what="token revocation")


@dataclass
class User:
    """A Keystone user with a role on one project."""

    name: str
    password: str
    project: str
    project_id: str = ""
    user_id: str = ""
    _token: str = field(default="", repr=False)


class Stack:
    """Keystone and Glance (keystone auth) on loopback, with users: ``admin`` (admin of the
    ``admin`` project), ``alice`` (member of ``alpha``), ``carol`` (reader of ``alpha``: she
    may see its images, not download them), ``bob`` (member of ``beta``), and the ``glance``
    service user (admin and service of ``service``). Glance's download_image rule is its
    default, restricted by the image property RESTRICTED_PROPERTY (see DOWNLOAD_POLICY)."""

    PASSWORD = "secret-interop"

    def __init__(self, state_dir: pathlib.Path, venv: pathlib.Path | None = None) -> None:
        self.state_dir = state_dir
        self.venv = venv if venv is not None else stack_venv()
        self.keystone = Keystone(state_dir / "keystone", self.venv, self.PASSWORD)
        self.admin = User("admin", self.PASSWORD, "admin")
        self.alice = User("alice", self.PASSWORD, "alpha")
        self.bob = User("bob", self.PASSWORD, "beta")
        self.carol = User("carol", self.PASSWORD, "alpha")
        self.service_user = User("glance", self.PASSWORD, "service")
        self.glance: RealGlance | None = None
        self.timings: dict[str, float] = {}

    def start(self) -> None:
        """Start Keystone and Glance, provision projects and users; if any of it fails, stop
        everything and raise RuntimeError saying why (with the server logs' tails when a
        server would not start)."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        began = time.monotonic()
        ks = self.keystone.url
        policy = self.state_dir / "glance-policy.yaml"
        policy.parent.mkdir(parents=True, exist_ok=True)
        policy.write_text(DOWNLOAD_POLICY)
        self.glance = RealGlance(
            self.state_dir / "glance",
            self.venv,
            overrides={
                "paste_deploy": {"flavor": "keystone"},
                "keystone_authtoken": {
                    "www_authenticate_uri": ks,
                    "auth_url": ks,
                    "auth_type": "password",
                    "username": self.service_user.name,
                    "password": self.service_user.password,
                    "project_name": self.service_user.project,
                    "user_domain_name": DOMAIN,
                    "project_domain_name": DOMAIN,
                    "token_cache_time": str(GLANCE_TOKEN_CACHE_TIME),
                },
                # Glance's own defaults (secure RBAC), not the legacy rules of the no-auth setup.
                "oslo_policy": {"enforce_new_defaults": "True", "enforce_scope": "True",
                                "policy_file": str(policy)},
            },
            workers=3,  # one may sit behind a held relay while the others answer
        )
        # Glance needs Keystone only once requests come: start both at once.
        with ThreadPoolExecutor(1) as pool:
            glance_started = pool.submit(self._timed, "glance", self.glance.start)
            self._timed("keystone", self.keystone.start)
            self._timed("provision", self._provision)
            glance_started.result()
        admin = self.token(self.admin)
        service = self.keystone.api(admin, "POST", "/v3/services",
                                    {"service": {"type": "image", "name": "glance"}})
        self.keystone.api(admin, "POST", "/v3/endpoints", {"endpoint": {
            "service_id": service["service"]["id"], "interface": "public",
            "url": self.glance.url, "region_id": REGION}})
        self.timings["total"] = time.monotonic() - began

    def _timed(self, what: str, step: Callable[[], None]) -> None:
        began = time.monotonic()
        step()
        self.timings[what] = round(time.monotonic() - began, 1)

    def _provision(self) -> None:
        admin = self.token(self.admin)
        roles = {r["name"]: r["id"] for r in self.keystone.api(admin, "GET", "/v3/roles")["roles"]}
        domain = self.keystone.api(admin, "GET", "/v3/domains?name=Default")["domains"][0]["id"]
        grants = {  # member implies reader (bootstrap makes the implied roles)
            self.alice.name: ("member",),
            self.carol.name: ("reader",),
            self.bob.name: ("member",),
            self.service_user.name: ("admin", "service"),
        }
        projects: dict[str, str] = {}
        for user in (self.alice, self.carol, self.bob, self.service_user):
            if user.project not in projects:
                projects[user.project] = self.keystone.api(admin, "POST", "/v3/projects", {
                    "project": {"name": user.project, "domain_id": domain}})["project"]["id"]
            user.project_id = projects[user.project]
            created = self.keystone.api(admin, "POST", "/v3/users", {"user": {
                "name": user.name, "password": user.password, "domain_id": domain,
                "default_project_id": user.project_id}})["user"]
            user.user_id = created["id"]
            for role in grants[user.name]:
                self.keystone.api(
                    admin, "PUT",
                    f"/v3/projects/{user.project_id}/users/{user.user_id}/roles/{roles[role]}")

    def stop(self) -> None:
        """Stop Glance and Keystone; idempotent."""
        if self.glance is not None:
            self.glance.stop()
        self.keystone.stop()

    def token(self, user: User, fresh: bool = False) -> str:
        """A token of ``user`` scoped to its project (reused unless ``fresh``)."""
        if fresh or not user._token:
            token, body = self.keystone.token(user.name, user.password, user.project)
            if not user.project_id:
                user.project_id = body["project"]["id"]
                user.user_id = body["user"]["id"]
            if fresh:
                return token
            user._token = token
        return user._token


def stack_venv() -> pathlib.Path:
    """The OpenStack venv (GLANCE_TEST_VENV or the default); raise if it lacks keystone."""
    venv = glance_venv()
    if not (venv / "bin" / "keystone-manage").exists():
        raise RuntimeError(
            f"the OpenStack venv at {venv} has no keystone: run tests/glance/setup-venv.sh"
        )
    return venv


@dataclass
class ClientRun:
    """What one run of osclient.py reported."""

    ok: bool
    result: Any
    error: str
    status: int | None
    http: list[dict[str, Any]]
    stderr: str

    def cache_statuses(self) -> list[str | None]:
        """X-Cache-Status of every image-data GET the client made, in order."""
        return [h.get("cache_status") for h in self.http
                if h["method"] == "GET" and h["url"].endswith("/file")]


class Clients:
    """Runs tests/interop/osclient.py with the OpenStack venv's python: python-glanceclient
    (with a token, as Nova does) or openstacksdk (password auth against Keystone), talking to
    the image API at ``endpoint``."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.python = stack.venv / "bin" / "python"
        self._started: list[subprocess.Popen[str]] = []

    def start(self, client: str, user: User, endpoint: str, *args: object,
              tokens: Sequence[str] = ()) -> subprocess.Popen[str]:
        """Start one osclient.py operation as ``user`` in the background (see ``finish``).
        glanceclient gets ``tokens`` (default: the user's current one), parallel clients one
        each in turn."""
        cmd: list[object] = [
            self.python, OSCLIENT_PY, "--client", client, "--endpoint", endpoint,
            "--auth-url", self.stack.keystone.url, "--username", user.name,
            "--password", user.password, "--project", user.project,
        ]
        if client == "glanceclient":
            for token in tokens or [self.stack.token(user)]:
                cmd += ["--token", token]
        proc = subprocess.Popen(
            [*map(str, cmd), *map(str, args)],
            env=clean_env(self.stack.venv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self._started.append(proc)
        return proc

    def stop_all(self) -> None:
        """Kill every operation started here that is still running (a failed test's)."""
        for proc in self._started:
            stop_process(proc, grace=1)
        self._started.clear()

    @staticmethod
    def finish(proc: subprocess.Popen[str], timeout: float = 180) -> ClientRun:
        """Wait for a started operation and parse what it reported (killed on timeout)."""
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        finally:
            stop_process(proc)
        lines = stdout.strip().splitlines()
        if not lines:
            raise RuntimeError(f"osclient.py {proc.args!r} printed nothing "
                               f"(exit {proc.returncode}):\n{stderr[-3000:]}")
        out = json.loads(lines[-1])
        return ClientRun(out["ok"], out.get("result"), out.get("error", ""),
                         out.get("status"), out.get("http", []), stderr[-3000:])

    def run(self, client: str, user: User, endpoint: str, *args: object,
            tokens: Sequence[str] = (), timeout: float = 180) -> ClientRun:
        """Run one osclient.py operation as ``user`` and return its report; a client-side
        failure is reported (``ok`` false), not raised."""
        return self.finish(self.start(client, user, endpoint, *args, tokens=tokens), timeout)
