"""The sizing job: from an access history, the hit ratios per cap and the Glance bytes
saved per day, as one JSON document.

It runs in the ``imgcache sizing`` process when it reads a stopped server's cache
directory, and as ``python -m imgcache.sizing`` (a JSON request on stdin, the answer on
stdout), started by a running server at low priority, so that numpy and numba never load
into the server. The request: ``history_dir``, ``max_bytes`` (the current cap),
``pinned`` (image id -> size), and optionally ``caps`` (bytes; default 1/4x to 8x the
cap), ``since`` (seconds back from now) and ``policies`` (true: compare with libCacheSim).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from imgcache.errors import SizingUnavailable

#: Default caps, as multiples of the current one.
DEFAULT_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
#: Exit status of the job when the ``sizing`` extra is not installed.
MISSING_EXTRA = 4
MISSING_EXTRA_MESSAGE = ("imgcache sizing needs numpy and numba (and matplotlib for --png): "
                         "pip install 'imgcache[sizing]' into imgcache's environment")


def default_caps(max_bytes: int) -> list[int]:
    """1/4x to 8x the current cap."""
    return [int(max_bytes * factor) for factor in DEFAULT_FACTORS]


def compute(request: dict[str, Any]) -> dict[str, Any]:
    """Answer one sizing request (see the module docstring)."""
    try:
        from imgcache import curve
    except ImportError as exc:
        raise SizingUnavailable(MISSING_EXTRA_MESSAGE) from exc
    max_bytes = int(request["max_bytes"])
    caps = [int(c) for c in request.get("caps") or default_caps(max_bytes)]
    pinned = {curve.key_of(i): int(s) for i, s in request.get("pinned", {}).items()}
    trace = curve.load_trace(Path(request["history_dir"]),
                             curve.since_time(request.get("since")))
    per_day = 86400.0 / curve.span_seconds(trace)
    rows = []
    for prediction in curve.predict(trace, caps, pinned):
        row = prediction.as_json()
        row.update(cap_factor=prediction.cap_bytes / max_bytes,
                   glance_bytes_saved_per_day=prediction.hit_bytes * per_day,
                   glance_bytes_per_day=(prediction.request_bytes - prediction.hit_bytes)
                   * per_day)
        rows.append(row)
    answer: dict[str, Any] = {
        "method": "exact" if trace.sample_rate == 1.0 else "shards",
        "kernel": curve.KERNEL_NAME or "none",
        "sample_rate": trace.sample_rate,
        "requests": trace.total_requests,
        "images": int(trace.sizes.shape[0]),
        "first_request": int(trace.time.min()) if trace.requests else None,
        "last_request": int(trace.time.max()) if trace.requests else None,
        "max_bytes": max_bytes,
        "pinned_bytes": sum(pinned.values()),
        "skipped_files": list(trace.skipped_files),
        "caps": rows,
    }
    if request.get("policies"):
        from imgcache.policies import compare

        answer["policies"] = compare(trace, caps, pinned)
    return answer


def main() -> int:
    """``python -m imgcache.sizing``: one request from stdin, the answer on stdout."""
    os.nice(19)  # a background job of the server: never compete with serving
    try:
        answer = compute(json.load(sys.stdin))
    except SizingUnavailable as exc:
        print(str(exc), file=sys.stderr)
        return MISSING_EXTRA
    json.dump(answer, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
