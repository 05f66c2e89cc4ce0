"""What the benchmarks need installed, installed when missing: programs from Debian (nginx,
varnish, wrk, Traffic Server, Squid) and matplotlib from PyPI into this venv (the charts).

Installing needs root; the package's own service is kept from starting (``policy-rc.d``
exit 101): Debian's nginx would listen on 0.0.0.0:80, its varnish on 0.0.0.0:6081.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from bench.common.lifecycle import progress

_SBIN = ("/usr/sbin", "/usr/local/sbin", "/usr/bin", "/usr/local/bin")
_updated = False


def find_program(binary: str) -> str | None:
    """Path of ``binary`` on PATH or in the usual sbin directories, else None."""
    return shutil.which(binary) or next(
        (f"{d}/{binary}" for d in _SBIN if os.access(f"{d}/{binary}", os.X_OK)), None)


def find_or_install(binary: str, package: str) -> str:
    """Path of ``binary``; runs ``apt-get install -y PACKAGE`` first when it is missing
    (root only; ``apt-get update`` once per run), without starting the package's service."""
    found = find_program(binary)
    if found:
        return found
    if os.geteuid() != 0:
        raise RuntimeError(f"{binary} is not installed; run: apt-get install -y {package}")
    global _updated
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    policy = Path("/usr/sbin/policy-rc.d")
    added_policy = not policy.exists()
    if added_policy:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    try:
        if not _updated:
            print(f"{binary} missing: apt-get update", flush=True)
            subprocess.run(["apt-get", "update"], check=True, env=env,
                           stdout=subprocess.DEVNULL)
            _updated = True
        print(f"apt-get install -y {package}", flush=True)
        subprocess.run(["apt-get", "install", "-y", package], check=True, env=env,
                       stdout=subprocess.DEVNULL)
    finally:
        if added_policy:
            policy.unlink(missing_ok=True)
    found = find_program(binary)
    if not found:
        raise RuntimeError(f"apt-get installed {package} but no {binary} was found")
    return found


def ensure_matplotlib() -> str:
    """matplotlib's version, installing it into this venv first when it is missing."""
    try:
        import matplotlib
    except ImportError:
        progress("matplotlib missing: pip install matplotlib (into this venv)")
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "matplotlib"],
                       check=True)
        import matplotlib
    return str(matplotlib.__version__)
