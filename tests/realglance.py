"""Run a real glance-api (installed from PyPI by setup-venv.sh) on loopback for tests.

Standard library only: the tests run in the project's venv, Glance runs in its own
(see tests/glance/setup-venv.sh). Everything here blocks; use it from synchronous fixtures.
"""

from __future__ import annotations

import configparser
import http.client
import json
import os
import pathlib
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from typing import Any

from processes import free_port, stop_process

DEFAULT_VENV = pathlib.Path.home() / ".cache" / "imgcache" / "glance-venv"

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

# Variables that would make Glance's python pick up the project's venv.
_FOREIGN_ENV = ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")


def glance_venv() -> pathlib.Path:
    """Return the Glance venv (GLANCE_TEST_VENV or the default); raise if it is missing."""
    venv = pathlib.Path(os.environ.get("GLANCE_TEST_VENV") or DEFAULT_VENV)
    needed = [venv / "bin" / name for name in ("python", "gunicorn", "glance-manage")]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise RuntimeError(
            f"no usable glance venv at {venv} (missing {', '.join(missing)}): "
            "run tests/glance/setup-venv.sh"
        )
    return venv


def tail(path: pathlib.Path, lines: int = 40) -> str:
    """Return the last lines of a text file, or a note that it does not exist."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"({path} does not exist)"
    return "\n".join(text.splitlines()[-lines:])


def clean_env(venv: pathlib.Path, **extra: str) -> dict[str, str]:
    """This process's environment for a program of ``venv``: its bin first on PATH, none of the
    variables that would make its python pick up the project's venv, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in _FOREIGN_ENV}
    env["PYTHONWARNINGS"] = "ignore::DeprecationWarning"  # eventlet's, on every import
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def start_gunicorn(
    venv: pathlib.Path,
    app: str,
    *,
    cwd: pathlib.Path,
    env: dict[str, str],
    access_log: pathlib.Path,
    server_log: pathlib.Path,
    workers: int = 2,
    port: int = 0,
    preload: bool = False,
) -> tuple[subprocess.Popen[bytes], int]:
    """Start ``gunicorn APP`` of ``venv`` on 127.0.0.1 (``port``, or a free one) in its own
    process group, its output appended to ``server_log``; return the process and the port.
    ``preload`` imports the app once in the master instead of once per worker."""
    port = port or free_port()
    # fmt: off
    cmd = [
        venv / "bin" / "gunicorn",
        "--bind", f"127.0.0.1:{port}",
        "--workers", str(workers),
        "--timeout", "300",
        "--no-control-socket",
        "--access-logfile", access_log,
        *(["--preload"] if preload else []),
        app,
    ]
    # fmt: on
    with server_log.open("ab") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return proc, port


def write_ini(path: pathlib.Path, text: str, overrides: Mapping[str, Mapping[str, str]]) -> None:
    """Write the INI ``text`` to ``path`` with ``overrides`` ({section: {key: value}}) set."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keep keys' case
    parser.read_string(text)
    parser.read_dict(overrides)
    with path.open("w") as fh:
        parser.write(fh)


def answers(url: str) -> bool:
    """Whether ``url`` answers with an HTTP status below 500."""
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return bool(resp.status < 500)
    except urllib.error.HTTPError as err:
        return err.code < 500
    except OSError:
        return False


def wait_until_answers(
    proc: subprocess.Popen[bytes], url: str, timeout: float, what: str
) -> None:
    """Poll ``url`` until it answers (see ``answers``); raise RuntimeError if ``proc`` exits
    or ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while not answers(url):
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} while starting")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not answer on {url} within {timeout} s")
        time.sleep(0.2)


class RealGlance:
    """A real glance-api (file store, sqlite) running under gunicorn on loopback; no keystone
    unless ``overrides`` configure it (see tests/interop/stack.py)."""

    def __init__(
        self,
        state_dir: pathlib.Path,
        venv: pathlib.Path | None = None,
        overrides: Mapping[str, Mapping[str, str]] | None = None,
        workers: int = 2,
    ) -> None:
        self.state_dir = pathlib.Path(state_dir)
        self.venv = venv if venv is not None else glance_venv()
        self.overrides = overrides or {}
        self.workers = workers
        self.venv_python = self.venv / "bin" / "python"
        self.port = 0
        self.url = ""
        self.access_log = self.state_dir / "access.log"
        self.server_log = self.state_dir / "gunicorn.log"
        self.glance_log = self.state_dir / "glance-api.log"
        self._proc: subprocess.Popen[bytes] | None = None

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

    def logs(self) -> str:
        """The tails of gunicorn's and Glance's logs, for error messages."""
        return "\n".join(f"--- {log}:\n{tail(log)}" for log in (self.server_log, self.glance_log))

    def start(self, timeout: float = 90) -> None:
        """Configure, migrate the database and start gunicorn; return once Glance answers."""
        if self._proc is not None:
            raise RuntimeError("glance is already running")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        conf = self._write_config()
        sync = subprocess.run(
            [self.venv / "bin" / "glance-manage", "--config-file", conf, "db_sync"],
            env=self._env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if sync.returncode != 0:
            out = "\n".join((sync.stdout + sync.stderr).splitlines()[-40:])
            raise RuntimeError(f"glance-manage db_sync failed ({sync.returncode}):\n{out}")

        self._proc, self.port = start_gunicorn(
            self.venv,
            "glance.wsgi.api:application",
            cwd=self.state_dir,
            env=self._env(),
            access_log=self.access_log,
            server_log=self.server_log,
            workers=self.workers,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        try:
            wait_until_answers(self._proc, f"{self.url}/versions", timeout, "glance-api")
        except RuntimeError as exc:
            self.stop()
            raise RuntimeError(f"{exc}:\n{self.logs()}") from None

    def stop(self) -> None:
        """Stop gunicorn and its workers (SIGTERM, then SIGKILL after 10 s); idempotent."""
        if self._proc is not None:
            stop_process(self._proc)
            self._proc = None

    def _request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        expect: tuple[int, ...] = (200,),
    ) -> bytes:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
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
        """Count the data downloads of an image (its GET /v2/images/{id}/file access lines)."""
        needle = f'"GET /v2/images/{image_id}/file '
        return sum(needle in line for line in self.access_lines())
