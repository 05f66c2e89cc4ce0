"""Child processes of the benchmark: started in sessions of their own, always stopped.

Every process the benchmark starts (nginx, imgcache, curl) goes through ``Processes``, which
stops each one's process group, by id, when the run ends for any reason.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any


class Processes:
    """A registry of the child processes of one run; ``close`` stops every one of them."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[Any]] = []

    def start(self, cmd: Sequence[str], *, stdout: int | IO[Any] | None = None,
              stderr: int | IO[Any] | None = None, text: bool = False,
              env: dict[str, str] | None = None) -> subprocess.Popen[Any]:
        """Start ``cmd`` in a session (and process group) of its own and remember it."""
        proc = subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=stdout,
                                stderr=stderr, text=text, env=env, start_new_session=True)
        self._procs.append(proc)
        return proc

    def forget(self, proc: subprocess.Popen[Any]) -> None:
        """Drop a process that has exited and been waited for."""
        with contextlib.suppress(ValueError):
            self._procs.remove(proc)

    def stop(self, proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
        """SIGTERM the process group of ``proc``, then SIGKILL it if it lingers."""
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
        # Leftover members of the group (nginx workers whose master died) go too.
        _signal_group(proc, signal.SIGKILL)
        self.forget(proc)

    def close(self) -> None:
        """Stop every process still registered, newest first (clients before servers)."""
        for proc in reversed(list(self._procs)):
            self.stop(proc)


def _signal_group(proc: subprocess.Popen[Any], signum: int) -> None:
    # The child is a session leader, so its pid names its process group; a group id cannot
    # be reused while any member lives, so this never reaches another program.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signum)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[Any], log: Path | None,
                   timeout: float = 30.0) -> None:
    """Wait until something accepts connections on 127.0.0.1:``port``; fail early (with the
    tail of ``log``) if ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}{_tail(log)}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{proc.args[0]} did not listen on port {port} in {timeout}s"
                       f"{_tail(log)}")


def _tail(log: Path | None, lines: int = 20) -> str:
    if log is None or not log.exists():
        return ""
    text = log.read_text(errors="replace").splitlines()[-lines:]
    return "\n--- " + str(log) + " ---\n" + "\n".join(text)


def run_text(cmd: Sequence[str]) -> str:
    """Run a short command and return its stdout and stderr, stripped ("" if it fails)."""
    try:
        done = subprocess.run(list(cmd), capture_output=True, text=True, timeout=30,
                              check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (done.stdout + done.stderr).strip()
