"""Programs of the OpenStack venv that tests/glance/setup-venv.sh builds: where it is, the
environment its programs run in, their INI config files, its ``*-manage`` commands, and a
WSGI app of it under gunicorn on loopback (``GunicornApp``: Glance in realglance.py, Keystone in
tests/interop/stack.py).

Standard library only: the tests run in the project's venv, the OpenStack programs in their
own. Everything here blocks; use it from synchronous fixtures.
"""

from __future__ import annotations

import configparser
import os
import pathlib
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence

from processes import free_port, stop_process

DEFAULT_VENV = pathlib.Path.home() / ".cache" / "imgcache" / "glance-venv"

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


def run_manage(
    cmd: Sequence[str | pathlib.Path], *, env: dict[str, str], timeout: float, what: str
) -> None:
    """Run a ``*-manage`` command (``what`` names it in errors) to its end; raise
    RuntimeError with the tail of its output if it fails."""
    run = subprocess.run(
        cmd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if run.returncode != 0:
        out = "\n".join((run.stdout + run.stderr).splitlines()[-40:])
        raise RuntimeError(f"{what} failed ({run.returncode}):\n{out}")


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
    host: str = "127.0.0.1",
    command_prefix: Sequence[str] = (),
) -> tuple[subprocess.Popen[bytes], int]:
    """Start ``gunicorn APP`` of ``venv`` on ``host`` (``port``, or a free one) in its own
    process group, its output appended to ``server_log``; return the process and the port.
    ``preload`` imports the app once in the master instead of once per worker;
    ``command_prefix`` (e.g. ``ip netns exec NETNS``) runs gunicorn through a wrapper that
    execs it."""
    port = port or free_port()
    # fmt: off
    cmd = [
        *command_prefix,
        venv / "bin" / "gunicorn",
        "--bind", f"{host}:{port}",
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


class GunicornApp:
    """A WSGI app of ``venv`` under gunicorn on ``host`` (127.0.0.1 unless told), run in
    ``state_dir`` through ``command_prefix`` if any: gunicorn's access log and output there
    (``access.log``, ``gunicorn.log``) next to the app's own ``app_log``; its ``port`` and
    ``url`` once it is started."""

    def __init__(
        self, state_dir: pathlib.Path, venv: pathlib.Path, app_log: pathlib.Path,
        host: str = "127.0.0.1", command_prefix: Sequence[str] = (),
    ) -> None:
        self.state_dir = pathlib.Path(state_dir)
        self.venv = venv
        self.host = host
        self.command_prefix = tuple(command_prefix)
        self.port = 0
        self.url = ""
        self.access_log = self.state_dir / "access.log"
        self.server_log = self.state_dir / "gunicorn.log"
        self._app_log = app_log
        self._proc: subprocess.Popen[bytes] | None = None

    def logs(self) -> str:
        """The tails of gunicorn's log and the app's, for error messages."""
        return "\n".join(f"--- {log}:\n{tail(log)}" for log in (self.server_log, self._app_log))

    def _serve(
        self,
        app: str,
        *,
        env: dict[str, str],
        health_path: str,
        timeout: float,
        what: str,
        workers: int,
        port: int = 0,
        preload: bool = False,
    ) -> None:
        """Start gunicorn with ``app`` on ``port`` (a free one if 0) and return once
        ``health_path`` answers; if it does not, stop gunicorn and raise RuntimeError with
        the logs' tails."""
        self._proc, self.port = start_gunicorn(
            self.venv,
            app,
            cwd=self.state_dir,
            env=env,
            access_log=self.access_log,
            server_log=self.server_log,
            workers=workers,
            port=port,
            preload=preload,
            host=self.host,
            command_prefix=self.command_prefix,
        )
        self.url = f"http://{self.host}:{self.port}"
        try:
            wait_until_answers(self._proc, f"{self.url}{health_path}", timeout, what)
        except RuntimeError as exc:
            self.stop()
            raise RuntimeError(f"{exc}:\n{self.logs()}") from None

    def stop(self) -> None:
        """Stop gunicorn and its workers (SIGTERM, then SIGKILL after 10 s); idempotent."""
        if self._proc is not None:
            stop_process(self._proc)
            self._proc = None
