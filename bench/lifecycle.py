"""What the benchmark entry points (``run.py``, ``peers.py``) share around a run: stop
signals turned into KeyboardInterrupt (and ignored while cleaning up), the run's temp dirs,
a log's tail when a measurement fails, and the exit status of a whole run.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

from imgcache_server import imgcache_binary
from measure import progress

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


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
