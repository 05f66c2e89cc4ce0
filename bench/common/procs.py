"""Child processes of the benchmark: started in sessions of their own, always stopped;
what /proc says about them (write bytes, peak RSS).

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


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (one of another user's counts too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_text(cmd: Sequence[str]) -> str:
    """Run a short command and return its stdout and stderr, stripped ("" if it fails)."""
    try:
        done = subprocess.run(list(cmd), capture_output=True, text=True, timeout=30,
                              check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (done.stdout + done.stderr).strip()


def group_pids(pgid: int) -> list[int]:
    """Live processes of the process group ``pgid`` (a server and its workers)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                # /proc/PID/stat: "pid (comm) state ppid pgrp ...", comm may hold spaces.
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[2]) == pgid:
                    pids.append(int(entry.name))
    return pids


def write_bytes(pids: Sequence[int]) -> int:
    """Bytes the processes caused to be sent to the block layer (``write_bytes`` of
    /proc/PID/io, all threads included); exited processes count no more."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/io").read_text().splitlines():
                if line.startswith("write_bytes:"):
                    total += int(line.split()[1])
    return total


def reset_peak_rss(pid: int) -> None:
    """Reset the process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0; needs the
    right to write /proc/PID/clear_refs: the process's owner or root)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def peak_rss(pid: int) -> int:
    """The process's peak resident set size (VmHWM) in bytes since start or the last
    ``reset_peak_rss``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM in /proc/{pid}/status")


def cpu_seconds(pids: Sequence[int]) -> float:
    """CPU time (user + system, all threads) the processes have used so far."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def threads_schedstat(pid: int) -> dict[int, tuple[str, float, float]]:
    """For each thread of a process, by thread id: its name (/proc/PID/task/TID/comm),
    seconds it has run on a CPU, and seconds it has waited in the run queue, runnable but
    with no CPU free (.../schedstat). A thread that ends while they are read is left out."""
    stats = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, ValueError):
            run, wait, _ = (task / "schedstat").read_text().split()
            name = (task / "comm").read_text().strip()
            stats[int(task.name)] = (name, int(run) / 1e9, int(wait) / 1e9)
    return stats


def machine_cpu() -> tuple[float, float]:
    """Busy and total CPU seconds of the whole machine since boot (/proc/stat; idle and
    iowait count as not busy)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    ticks = os.sysconf("SC_CLK_TCK")
    total = sum(fields)
    return (total - fields[3] - fields[4]) / ticks, total / ticks
