"""The LRU hit-ratio curve of an access history, exact in one pass per set of bypassed
images, or estimated by SHARDS spatial sampling when the history is too large.

The model is imgcache's own cache: LRU over whole images under a byte cap. Its content is
always the most recently used images whose sizes, added up from the most recent one, fit
under the cap; so a request hits at cap C exactly when the bytes of the distinct images
requested since that image's last request, plus its own size (its *stack distance*), fit
in C. A Fenwick tree over request positions gives every request's stack distance in one
pass; any number of caps is then a comparison. As in the server, pinned images are always
hits and shrink the usable cap, images larger than the usable cap are streamed through
(never cached, so they take no room), and a COALESCED request counts as a hit (it cost
Glance nothing). ERROR requests are left out: nothing was cached for them.

Numpy (and numba, which compiles the one pass) come with ``imgcache[sizing]``; they are
imported only by the sizing command and its job, never by the server.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imgcache.history_files import HEADER, RECORD, RESULT_CODES, check_header, history_files

#: The history files' records, as numpy reads them.
RECORD_DTYPE = np.dtype([("size", "<u8"), ("image", "V16"), ("time", "<u4"),
                         ("result", "u1"), ("spare", "V3")])
assert RECORD_DTYPE.itemsize == RECORD.size
#: Results the model replays (ERROR requests are left out).
MODELLED = np.array([RESULT_CODES.index(r) for r in ("hit", "miss", "coalesced", "bypass")],
                    dtype=np.uint8)
#: Up to this many requests the curve is exact; above it, SHARDS samples images at a rate
#: that keeps about this many requests (10 million take about 1 s and 400 MB).
EXACT_LIMIT = 10_000_000
#: Records read from a history file at a time, so memory follows what is kept.
_READ_CHUNK = 1 << 20
#: SHARDS: an image is sampled when the low 24 bits of its hash are below rate * 2**24.
_HASH_SPACE = 1 << 24


@dataclass
class Trace:
    """Requests to replay: per request the dense image index and time; per image its size
    and 64-bit key (see ``image_keys``)."""

    image: np.ndarray  # int64, one per request
    time: np.ndarray  # uint32, one per request
    sizes: np.ndarray  # int64, one per image
    keys: np.ndarray  # uint64, one per image
    sample_rate: float = 1.0  # SHARDS rate; 1.0: every request is here
    total_requests: int = 0  # modelled requests in the history, sampled or not
    skipped_files: tuple[str, ...] = ()  # history files that could not be read, and why

    @property
    def requests(self) -> int:
        """Requests in the trace."""
        return int(self.image.shape[0])


@dataclass(frozen=True)
class CapPrediction:
    """What LRU would have done over the trace with one cap."""

    cap_bytes: int
    hit_ratio: float
    byte_hit_ratio: float
    hits: float  # requests (scaled up by 1 / sample rate)
    requests: float
    hit_bytes: float
    request_bytes: float
    below_pinned: bool  # the cap cannot even hold the pinned images

    def as_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"cap_bytes": self.cap_bytes, "hit_ratio": self.hit_ratio,
                "byte_hit_ratio": self.byte_hit_ratio, "hits": self.hits,
                "requests": self.requests, "hit_bytes": self.hit_bytes,
                "request_bytes": self.request_bytes, "below_pinned": self.below_pinned}


def image_keys(raw: np.ndarray) -> np.ndarray:
    """A 64-bit key per 16-byte image id (V16 array): its two halves mixed (splitmix64's
    finaliser), so that the low bits are uniform for SHARDS and distinct ids collide with
    odds of about 2**-64 per pair."""
    halves = np.frombuffer(np.ascontiguousarray(raw).tobytes(), dtype="<u8").reshape(-1, 2)
    with np.errstate(over="ignore"):
        key = halves[:, 0] ^ (halves[:, 1] * np.uint64(0x9E3779B97F4A7C15))
        key = (key ^ (key >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        key = (key ^ (key >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return key ^ (key >> np.uint64(31))


def key_of(image_id: str) -> int:
    """``image_keys`` of one image id in its usual text form."""
    import uuid

    raw = np.frombuffer(uuid.UUID(image_id).bytes, dtype="V16")
    return int(image_keys(raw)[0])


def _chunks(path: Path) -> Iterator[np.ndarray]:
    count = (path.stat().st_size - HEADER.size) // RECORD.size
    for start in range(0, count, _READ_CHUNK):
        yield np.fromfile(path, dtype=RECORD_DTYPE, count=min(_READ_CHUNK, count - start),
                          offset=HEADER.size + start * RECORD.size)


def count_requests(directory: Path, since: float | None = None) -> int:
    """Modelled requests in the history at or after Unix time ``since``."""
    total = 0
    for path in _readable(directory, []):
        for chunk in _chunks(path):
            keep = np.isin(chunk["result"], MODELLED)
            if since is not None:
                keep &= chunk["time"] >= since
            total += int(keep.sum())
    return total


def _readable(directory: Path, skipped: list[str]) -> list[Path]:
    usable = []
    for path in history_files(directory):
        if not path.exists():
            continue
        problem = check_header(path)
        if problem is None:
            usable.append(path)
        else:
            skipped.append(f"{path.name}: {problem}")
    return usable


def load_trace(directory: Path, since: float | None = None,
               exact_limit: int = EXACT_LIMIT) -> Trace:
    """The modelled requests of the history in ``directory`` at or after Unix time
    ``since``: all of them up to ``exact_limit``, else a SHARDS sample by image id at
    the rate that keeps about ``exact_limit``."""
    skipped: list[str] = []
    stored = sum((path.stat().st_size - HEADER.size) // RECORD.size
                 for path in _readable(directory, []))
    total = stored if stored <= exact_limit else count_requests(directory, since)
    rate = 1.0 if total <= exact_limit else exact_limit / total
    threshold = np.uint64(int(rate * _HASH_SPACE))
    keys_parts, sizes_parts, times_parts = [], [], []
    for path in _readable(directory, skipped):
        for chunk in _chunks(path):
            keep = np.isin(chunk["result"], MODELLED)
            if since is not None:
                keep &= chunk["time"] >= since
            chunk = chunk[keep]
            keys = image_keys(chunk["image"])
            if rate < 1.0:
                sampled = (keys & np.uint64(_HASH_SPACE - 1)) < threshold
                chunk, keys = chunk[sampled], keys[sampled]
            keys_parts.append(keys)
            sizes_parts.append(chunk["size"].astype(np.int64))
            times_parts.append(chunk["time"])
    if not keys_parts:
        empty = np.zeros(0, dtype=np.int64)
        return Trace(empty, np.zeros(0, np.uint32), empty, np.zeros(0, np.uint64), rate,
                     0, tuple(skipped))
    keys = np.concatenate(keys_parts)
    request_sizes = np.concatenate(sizes_parts)
    unique_keys, image = np.unique(keys, return_inverse=True)
    sizes = np.zeros(unique_keys.shape[0], dtype=np.int64)
    sizes[image] = request_sizes  # an image's size never changes; the last one written wins
    return Trace(image.astype(np.int64), np.concatenate(times_parts), sizes, unique_keys,
                 rate, int(keys.shape[0]) if rate == 1.0 else total,
                 tuple(skipped))


def one_pass(image: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """The one pass of ``stack_distances`` in plain Python and numpy; numba compiles it
    where it can (``stack_distances_kernel``)."""
    count = image.shape[0]
    # tree (Fenwick) sums, over request positions, the size of each image at the position
    # of its latest request.
    tree = np.zeros(count + 1, np.int64)
    last = np.full(sizes.shape[0], -1, np.int64)
    out = np.empty(count, np.int64)
    for i in range(count):
        x = image[i]
        size = sizes[x]
        previous = last[x]
        if previous < 0:
            out[i] = -1
        else:
            total = 0  # positions previous+1 .. i-1: prefix(i) - prefix(previous+1)
            k = i
            while k > 0:
                total += tree[k]
                k -= k & -k
            k = previous + 1
            while k > 0:
                total -= tree[k]
                k -= k & -k
            out[i] = total + size
            k = previous + 1
            while k <= count:
                tree[k] -= size
                k += k & -k
        k = i + 1
        while k <= count:
            tree[k] += size
            k += k & -k
        last[x] = i
    return out


_KERNEL: Any = None
#: Which kernel runs: "numba", or "python" where numba is missing or may not compile (no
#: executable memory, as under the systemd unit's MemoryDenyWriteExecute=yes): about 20 us
#: a request instead of 0.07 us.
KERNEL_NAME = ""


def stack_distances_kernel() -> Any:
    """The one-pass kernel: ``one_pass`` compiled by numba (on first use, about 1 s),
    else ``one_pass`` itself."""
    global _KERNEL, KERNEL_NAME
    if _KERNEL is None:
        try:
            import numba

            _KERNEL, KERNEL_NAME = numba.njit(nogil=True, cache=False)(one_pass), "numba"
        except (ImportError, OSError):  # OSError: "cannot allocate executable memory"
            _KERNEL, KERNEL_NAME = one_pass, "python"
    return _KERNEL


def stack_distances(image: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Per request, the bytes of the distinct images requested since this image's previous
    request plus its own size; -1 for an image's first request."""
    return stack_distances_kernel()(np.ascontiguousarray(image, dtype=np.int64),
                                     np.ascontiguousarray(sizes, dtype=np.int64))


def predict(trace: Trace, caps: Sequence[int],
            pinned: Mapping[int, int] | None = None) -> list[CapPrediction]:
    """LRU's request and byte hit ratios over ``trace`` for each cap. ``pinned`` maps the
    ``key_of`` of each pinned image to its size: those are hits and take their bytes off
    every cap. Caps sharing the same set of too-large images share one pass."""
    pinned = pinned or {}
    pinned_bytes = sum(pinned.values())
    is_pinned = np.isin(trace.keys, np.fromiter(pinned, dtype=np.uint64, count=len(pinned)))
    request_sizes = trace.sizes[trace.image].astype(np.float64)
    request_pinned = is_pinned[trace.image]
    scale = 1.0 / trace.sample_rate
    requests = float(trace.total_requests or trace.requests)
    # SHARDS-adj (Waldspurger et al., FAST '15): the sample holds more or fewer requests
    # than rate x total; the difference is counted at the smallest distance, i.e. as hits
    # at every cap (zero when nothing is sampled away). Bytes are estimated within the
    # sample: adjusting them the same way measured worse (tests/test_curve.py).
    extra_hits = requests - trace.requests * scale
    request_bytes = float(request_sizes.sum()) * scale
    pinned_hits = float(request_pinned.sum()) * scale
    pinned_hit_bytes = float(request_sizes[request_pinned].sum()) * scale
    # The server caches an image only if it fits in the cap less the pinned bytes.
    usable = {cap: max(0, cap - pinned_bytes) for cap in caps}
    sorted_sizes = np.sort(trace.sizes[~is_pinned])
    groups: dict[int, list[int]] = {}
    for cap in caps:
        # SHARDS scales distances, not sizes: an image bypasses on its real size.
        groups.setdefault(int(np.searchsorted(sorted_sizes, usable[cap], "right")),
                          []).append(cap)
    results: dict[int, CapPrediction] = {}
    for members in groups.values():
        fits = trace.sizes <= usable[members[0]]
        stream = ~request_pinned & fits[trace.image]
        image = trace.image[stream]
        sizes = request_sizes[stream]
        distances = stack_distances(image, trace.sizes).astype(np.float64)
        # Under SHARDS the other images' bytes stand for 1 / rate as many; the image's own
        # size is its own. A first request (-1) stays negative.
        distances = np.where(distances < 0, -1.0, (distances - sizes) * scale + sizes)
        for cap in members:
            hit = (distances >= 0) & (distances <= usable[cap])
            hits = float(hit.sum()) * scale + pinned_hits + extra_hits
            hit_bytes = float(sizes[hit].sum()) * scale + pinned_hit_bytes
            results[cap] = CapPrediction(
                cap_bytes=int(cap), hit_ratio=hits / requests if requests else 0.0,
                byte_hit_ratio=hit_bytes / request_bytes if request_bytes else 0.0,
                hits=hits, requests=requests, hit_bytes=hit_bytes,
                request_bytes=request_bytes, below_pinned=cap < pinned_bytes)
    return [results[cap] for cap in caps]


def span_seconds(trace: Trace) -> float:
    """Seconds from the first request of the trace to the last (at least 1)."""
    if not trace.requests:
        return 1.0
    return max(1.0, float(trace.time.max()) - float(trace.time.min()))


def since_time(since_seconds: float | None, now: float | None = None) -> float | None:
    """The Unix time ``since_seconds`` before now (None: the whole history)."""
    if since_seconds is None:
        return None
    return (time.time() if now is None else now) - since_seconds
