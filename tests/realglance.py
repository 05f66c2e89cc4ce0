"""Run a real glance-api (installed from PyPI by setup-venv.sh) for tests, on loopback or at the
far end of the test network (tests/netlink).

Standard library only: the tests run in the project's venv, Glance runs in its own
(see tests/glance/setup-venv.sh and openstack_venv.py). Everything here blocks; use it from
synchronous fixtures.
"""

from __future__ import annotations

import http.client
import json
import pathlib
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from openstack_venv import GunicornApp, clean_env, glance_venv, run_manage, write_ini

# File store and sqlite under the state dir, no keystone (paste flavor unset: no auth).
CONFIG_TEMPLATE = """\
[DEFAULT]
bind_host = 127.0.0.1
enabled_backends = fs:file
log_file = {state}/glance-api.log
[database]
connection = sqlite:///{state}/glance.sqlite
[glance_store]
default_backend = fs
[fs]
filesystem_store_datadir = {state}/images/
[os_glance_staging_store]
filesystem_store_datadir = {state}/staging/
[os_glance_tasks_store]
filesystem_store_datadir = {state}/tasks/
[oslo_concurrency]
lock_path = {state}/locks
[paste_deploy]
config_file = {state}/glance-api-paste.ini
[oslo_policy]
enforce_new_defaults = False
enforce_scope = False
"""


class RealGlance(GunicornApp):
    """A real glance-api (file store, sqlite) running under gunicorn on ``host`` (loopback
    unless told; ``command_prefix`` runs it elsewhere, e.g. in a network namespace); no keystone
    unless ``overrides`` configure it (see tests/interop/stack.py)."""

    def __init__(
        self,
        state_dir: pathlib.Path,
        venv: pathlib.Path | None = None,
        overrides: Mapping[str, Mapping[str, str]] | None = None,
        workers: int = 2,
        host: str = "127.0.0.1",
        command_prefix: Sequence[str] = (),
    ) -> None:
        state_dir = pathlib.Path(state_dir)
        self.glance_log = state_dir / "glance-api.log"
        super().__init__(state_dir, venv if venv is not None else glance_venv(), self.glance_log,
                         host, command_prefix)
        self.overrides = overrides or {}
        self.workers = workers
        self.venv_python = self.venv / "bin" / "python"

    def __enter__(self) -> RealGlance:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _env(self) -> dict[str, str]:
        return clean_env(self.venv, OS_GLANCE_CONFIG_DIR=str(self.state_dir))

    def _write_config(self) -> pathlib.Path:
        for sub in ("images", "staging", "tasks", "locks"):
            (self.state_dir / sub).mkdir(parents=True, exist_ok=True)
        shutil.copy(
            self.venv / "etc" / "glance" / "glance-api-paste.ini",
            self.state_dir / "glance-api-paste.ini",
        )
        conf = self.state_dir / "glance-api.conf"
        write_ini(conf, CONFIG_TEMPLATE.format(state=self.state_dir), self.overrides)
        return conf

    def start(self, timeout: float = 90) -> None:
        """Configure, migrate the database and start gunicorn; return once Glance answers."""
        if self._proc is not None:
            raise RuntimeError("glance is already running")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        conf = self._write_config()
        run_manage(
            [self.venv / "bin" / "glance-manage", "--config-file", conf, "db_sync"],
            env=self._env(),
            timeout=timeout,
            what="glance-manage db_sync",
        )
        self._serve(
            "glance.wsgi.api:application",
            env=self._env(),
            health_path="/versions",
            timeout=timeout,
            what="glance-api",
            workers=self.workers,
        )

    def _request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        expect: tuple[int, ...] = (200,),
    ) -> bytes:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=120)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        if resp.status not in expect:
            text = data[:500].decode(errors="replace")
            raise RuntimeError(f"{method} {path} answered {resp.status}: {text}")
        return data

    def image(self, image_id: str) -> dict[str, Any]:
        """Return an image's metadata (GET /v2/images/{id})."""
        result: dict[str, Any] = json.loads(self._request("GET", f"/v2/images/{image_id}"))
        return result

    def create_image(self, data_path: pathlib.Path, name: str = "test") -> dict[str, Any]:
        """Create a private raw/bare image, upload the file streamed, return its active metadata."""
        # Without keystone only an admin could make it public: keep the default (private/shared).
        created = json.loads(
            self._request(
                "POST",
                "/v2/images",
                body=json.dumps({"name": name, "disk_format": "raw", "container_format": "bare"}),
                headers={"Content-Type": "application/json"},
                expect=(201,),
            )
        )
        image_id = created["id"]
        size = pathlib.Path(data_path).stat().st_size
        with open(data_path, "rb") as fh:  # http.client streams a file body in blocks
            self._request(
                "PUT",
                f"/v2/images/{image_id}/file",
                body=fh,
                headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
                expect=(204,),
            )
        meta = self.image(image_id)
        if meta.get("status") != "active" or not meta.get("os_hash_value"):
            raise RuntimeError(f"image {image_id} is not active with a hash after upload: {meta}")
        return meta

    def access_lines(self) -> Iterator[str]:
        """Yield the lines of gunicorn's access log so far."""
        if self.access_log.exists():
            yield from self.access_log.read_text(errors="replace").splitlines()

    def data_gets(self, image_id: str) -> int:
        """Count the downloads of an image that carried its data (GET /v2/images/{id}/file
        access lines answered 200, or 206 with more than imgcache's one-byte download
        check); refusals and download checks are left out."""
        return sum(status in (200, 206) and size > 1
                   for status, size in self._data_answers(image_id))

    def _data_answers(self, image_id: str) -> list[tuple[int, int]]:
        """(status, body bytes) of every data GET of an image, from the access log."""
        pattern = re.compile(rf'"GET /v2/images/{image_id}/file [^"]*" (\d+) (\d+|-)')
        return [(int(m.group(1)), int(m.group(2)) if m.group(2) != "-" else 0)
                for line in self.access_lines() if (m := pattern.search(line))]

