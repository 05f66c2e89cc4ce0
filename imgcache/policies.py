"""What other eviction policies would have done over the same history: a what-if, replayed
by libCacheSim (``imgcache[policies]``). imgcache itself stays LRU.

libCacheSim's oracleGeneral trace holds sizes as 32-bit numbers, so sizes and caps go to
it in KiB (rounded up): at images of 200 MiB and more that changes a ratio by far less
than 0.001. Its LRU is replayed too, as a check against imgcache's own exact curve.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from imgcache.curve import Trace
from imgcache.errors import SizingUnavailable

#: Policies compared, by libCacheSim class name, and how they are shown.
POLICIES = {"LRU": "LRU", "S3FIFO": "S3-FIFO", "Sieve": "SIEVE", "GDSF": "GDSF"}
_UNIT = 1024
_ORACLE_GENERAL = np.dtype([("time", "<u4"), ("object", "<u8"), ("size", "<u4"),
                            ("next", "<i8")])


def _next_access(image: np.ndarray) -> np.ndarray:
    """Per request, the index of the next request of the same image (-1: none)."""
    order = np.lexsort((np.arange(image.shape[0]), image))
    following = np.full(image.shape[0], -1, dtype=np.int64)
    same = image[order[1:]] == image[order[:-1]]
    following[order[:-1][same]] = order[1:][same]
    return following


def compare(trace: Trace, caps: Sequence[int],
            pinned: Mapping[int, int] | None = None) -> dict[str, list[dict[str, float]]]:
    """Per policy, per cap (in ``caps`` order), the request and byte hit ratios over
    ``trace``; pinned images are hits and take their bytes off the cap, as for LRU."""
    try:
        import libcachesim
    except ImportError as exc:
        raise SizingUnavailable(
            "comparing eviction policies needs libCacheSim: pip install "
            "'imgcache[policies]'") from exc
    pinned = pinned or {}
    is_pinned = np.isin(trace.keys, np.fromiter(pinned, dtype=np.uint64, count=len(pinned)))
    request_pinned = is_pinned[trace.image]
    sizes = trace.sizes[trace.image].astype(np.float64)
    stream = trace.image[~request_pinned]
    records = np.zeros(stream.shape[0], dtype=_ORACLE_GENERAL)
    records["time"] = trace.time[~request_pinned]
    records["object"] = stream + 1
    records["size"] = -(-trace.sizes[stream] // _UNIT)
    records["next"] = _next_access(stream)
    pinned_bytes = sum(pinned.values())
    total, total_bytes = float(trace.image.shape[0]), float(sizes.sum())
    replayed, replayed_bytes = float(stream.shape[0]), float(sizes[~request_pinned].sum())
    results: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="imgcache-policies-") as work:
        path = Path(work) / "trace.oracleGeneral"
        records.tofile(path)
        for name, shown in POLICIES.items():
            rows = []
            for cap in caps:
                usable = max(1, (cap - pinned_bytes) // _UNIT)
                reader = libcachesim.TraceReader(str(path),
                                                 libcachesim.TraceType.ORACLE_GENERAL_TRACE)
                miss, byte_miss = getattr(libcachesim, name)(cache_size=usable).process_trace(
                    reader) if replayed else (0.0, 0.0)
                hits = (1 - miss) * replayed + (total - replayed)
                hit_bytes = (1 - byte_miss) * replayed_bytes + (total_bytes - replayed_bytes)
                rows.append({"hit_ratio": hits / total if total else 0.0,
                             "byte_hit_ratio": hit_bytes / total_bytes if total_bytes else 0.0})
            results[shown] = rows
    return results
