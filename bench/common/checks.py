"""The correctness checks every benchmark makes along the way: ``Checks`` counts them per kind
(a failure fails the run); complete downloads; saved bodies hashed against the image.
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from bench.common.curls import Batch, Download
from bench.common.images import file_sha512
from bench.common.lifecycle import progress


@dataclass
class Checks:
    """Correctness checks made along the way, counted per kind; a failure fails the run."""

    passed: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)
    first_failure: dict[str, str] = field(default_factory=dict)
    seen: dict[str, None] = field(default_factory=dict)  # an ordered set

    def expect(self, name: str, ok: bool, detail: str = "") -> bool:
        """Record one check of kind ``name``; ``detail`` explains a failure."""
        self.seen.setdefault(name)
        if ok:
            self.passed[name] += 1
        else:
            self.failed[name] += 1
            self.first_failure.setdefault(name, detail)
            progress(f"CHECK FAILED: {name}: {detail}")
        return ok

    def names(self) -> list[str]:
        """Every kind of check made, in the order first seen."""
        return list(self.seen)


def check_download(checks: Checks, name: str, got: Download, size: int,
                   cache_status: str | None = None) -> None:
    """Expect a complete 200 download (and the given X-Cache-Status, if any)."""
    ok = got.status == 200 and got.size == size and not got.error
    if cache_status is not None:
        ok = ok and got.cache_status == cache_status
    checks.expect(name, ok, f"status {got.status}, {got.size} of {size} bytes, "
                            f"X-Cache-Status {got.cache_status or '-'} "
                            f"(wanted {cache_status or 'any'}) {got.error}".strip())


def check_batch(checks: Checks, name: str, batch: Batch, size: int,
                cache_status: str | None = None) -> None:
    """``check_download`` for every download of a batch."""
    for got in batch.downloads:
        check_download(checks, name, got, size, cache_status)


def verified_indices(clients: int, verify: int) -> set[int]:
    """The first and last clients started, alternately, ``verify`` of them."""
    ends = [i // 2 if i % 2 == 0 else clients - 1 - i // 2 for i in range(clients)]
    return set(ends[:min(verify, clients)])


def verify_bodies(paths: list[Path], sha512: str) -> int:
    """How many of ``paths`` hash to ``sha512`` (checked in parallel, then deleted)."""
    try:
        with ThreadPoolExecutor(max(1, len(paths))) as pool:
            digests = list(pool.map(_digest_or_none, paths))
    finally:
        for path in paths:
            path.unlink(missing_ok=True)
    return sum(1 for digest in digests if digest == sha512)


def _digest_or_none(path: Path) -> str | None:
    return file_sha512(path) if path.exists() else None
