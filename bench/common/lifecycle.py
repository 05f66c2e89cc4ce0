"""What the benchmark entry points share around a run: progress lines, checks before
starting (curl's version, free disk), stop signals turned into KeyboardInterrupt (and
ignored while cleaning up), the run's temp dirs (and sweeping those of killed runs), where
checked bodies go, flushing dirty pages between timings, a log's tail when a measurement
fails, and the exit status of a whole run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

from bench.common.images import human_size
from bench.common.imgcache_server import imgcache_binary
from bench.common.paths import WORK
from bench.common.procs import pid_alive, run_text

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
#: curl's ``%header{}`` write-out variable appeared in 7.84.
MIN_CURL = (7, 84)


def progress(message: str) -> None:
    """A progress line on stderr (stdout carries the report)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def argument_parser(module: str, doc: str) -> argparse.ArgumentParser:
    """An entry point's option parser: its usage line names ``python -m MODULE``, its
    description is the first paragraph of the module's docstring ``doc``."""
    return argparse.ArgumentParser(prog=f"python -m {module}", description=doc.split("\n\n")[0])


def check_curl() -> None:
    """Fail early unless a curl new enough for the ``-w`` variables used is installed."""
    version = run_text(["curl", "--version"])
    match = re.match(r"curl (\d+)\.(\d+)", version)
    if not match:
        raise RuntimeError("curl is not installed (apt-get install -y curl)")
    if (int(match.group(1)), int(match.group(2))) < MIN_CURL:
        raise RuntimeError(f"curl >= {'.'.join(map(str, MIN_CURL))} needed, found "
                           f"{version.split()[1]}")


def check_disk(need: int) -> None:
    """Fail early when bench/work cannot hold imgcache's cache for this run."""
    free = shutil.disk_usage(WORK).free
    if free < need:
        raise RuntimeError(f"{WORK} has {human_size(free)} free; this run needs about "
                           f"{human_size(need)} (imgcache's cache); try --quick")


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def restore_interrupts() -> None:
    """Make SIGINT, SIGTERM and SIGHUP raise KeyboardInterrupt, so a run cleans up."""
    for signum in _STOP_SIGNALS:
        signal.signal(signum, _interrupt)


def ignore_interrupts() -> None:
    """Let cleanup finish even if Ctrl-C is pressed again."""
    for signum in _STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


@contextlib.contextmanager
def temp_dir(parent: Path, prefix: str, keep: bool = False) -> Iterator[Path]:
    """A fresh directory under ``parent``, removed on exit (unless ``keep``)."""
    parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield path
    finally:
        if keep:
            progress(f"kept {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def show_log(log: Path, lines: int = 30) -> None:
    """Print the last ``lines`` of ``log`` (if it exists) as a progress line."""
    if log.exists():
        tail = log.read_text(errors="replace").splitlines()[-lines:]
        progress(f"last lines of {log}:\n" + "\n".join(tail))


def exit_status(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a whole benchmark, ``run(args)``, and return the process's exit status: its own
    (1 when a check failed), 2 without the repo's imgcache, 1 on an error, 130 on
    interruption (everything started has been stopped by then)."""
    restore_interrupts()
    if not imgcache_binary().exists():
        print(f"no {imgcache_binary()}: run with the repo's venv python", file=sys.stderr)
        return 2
    try:
        return run(args)
    except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        progress("interrupted; everything started was stopped and removed")
        return 130


def sweep_stale_runs() -> None:
    """Create bench/work if need be, and remove the run dirs of earlier runs whose process is
    gone (killed with -9, say)."""
    WORK.mkdir(parents=True, exist_ok=True)
    for old in WORK.glob("run-*"):
        match = re.match(r"run-(\d+)-", old.name)
        if match and not pid_alive(int(match.group(1))):
            shutil.rmtree(old, ignore_errors=True)


def enter_run(stack: contextlib.ExitStack, keep: bool, scratch_need: int) -> tuple[Path, Path]:
    """Enter a run on ``stack``: stop signals raise KeyboardInterrupt, and two dirs removed
    when the stack unwinds: the run's own under bench/work (named after this pid, for
    ``sweep_stale_runs``; kept with ``keep``) and one for ``scratch_need`` bytes of checked
    bodies (see ``scratch_parent``). Returns (run dir, scratch dir)."""
    stack.callback(restore_interrupts)
    run_dir = stack.enter_context(temp_dir(WORK, f"run-{os.getpid()}-", keep))
    scratch = stack.enter_context(temp_dir(scratch_parent(run_dir, scratch_need),
                                           "imgcache-bench-"))
    return run_dir, scratch


def scratch_parent(run_dir: Path, need: int) -> Path:
    """Where checked storm bodies go: /dev/shm when it has room (no disk writes competing
    with imgcache's fill), else the run dir."""
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > need + (256 << 20):
        return shm
    return run_dir


def settle() -> None:
    """Flush dirty pages so an earlier fill's writeback does not land in the next timing."""
    os.sync()
