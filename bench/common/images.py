"""Image files for the benchmark: random bytes plus the hashes Glance would report.

Generated once per size and kept in ``bench/work/images/`` (gitignored), so later runs only
read them back.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", re.IGNORECASE)
_CHUNK = 8 << 20


@dataclass(frozen=True)
class TestImage:
    """An image file and its Glance checksums."""

    path: Path
    size: int
    md5: str
    sha512: str


def parse_size(text: str) -> int:
    """Parse ``1073741824``, ``256M``, ``1G`` (binary units, as imgcache's --max-size)."""
    match = _SIZE.fullmatch(text)
    if not match:
        raise ValueError(f"not a size: {text!r} (expected e.g. 256M or 1G)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def human_size(size: int) -> str:
    """``1073741824`` -> ``1 GiB``; ``268435456`` -> ``256 MiB``."""
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= factor:
            return f"{size / factor:g} {unit}"
    return f"{size} B"


def ensure_image(size: int, images_dir: Path) -> TestImage:
    """Return the cached random image of ``size`` bytes, generating it if missing."""
    images_dir.mkdir(parents=True, exist_ok=True)
    data = images_dir / f"{size}.bin"
    meta = images_dir / f"{size}.json"
    if data.exists() and meta.exists() and data.stat().st_size == size:
        hashes = json.loads(meta.read_text())
        return TestImage(data, size, hashes["md5"], hashes["sha512"])
    meta.unlink(missing_ok=True)  # never pair new bytes with an older file's hashes
    md5, sha512 = _generate(data, size)
    _write_atomically(meta, json.dumps({"md5": md5, "sha512": sha512}))
    return TestImage(data, size, md5, sha512)


def _generate(path: Path, size: int) -> tuple[str, str]:
    """Write ``size`` random bytes to ``path`` (via a temp name); return md5 and sha512."""
    md5, sha512 = hashlib.md5(), hashlib.sha512()
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as out:
        remaining = size
        while remaining:
            chunk = os.urandom(min(_CHUNK, remaining))
            out.write(chunk)
            md5.update(chunk)
            sha512.update(chunk)
            remaining -= len(chunk)
    tmp.rename(path)
    return md5.hexdigest(), sha512.hexdigest()


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.rename(path)


def file_sha512(path: Path) -> str:
    """The sha512 hex digest of a file."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha512").hexdigest()
