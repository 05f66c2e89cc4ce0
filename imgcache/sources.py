"""Where an authorized download's bytes come from: the cached file (HIT), a fill's growing
file (MISS when this request started the fill, COALESCED when it joined one), or Glance
itself (BYPASS, with the reason the image cannot be cached now)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from imgcache.digest import Expected
from imgcache.fill import Bypass, Cached, Fill, FillRegistry
from imgcache.openfiles import OpenFile, OpenFiles
from imgcache.store import Entry, Store

#: Looks before giving up on an entry or fill that keeps vanishing under the caller.
_LOOKS = 3


@dataclass(frozen=True)
class CachedFile:
    """A committed entry's file, open for this request (give it back to the store)."""

    entry: Entry
    handle: OpenFile


@dataclass(frozen=True)
class GrowingFile:
    """A fill's file, with an fd of this request's own (close it); ``started`` when this
    request started the fill."""

    fill: Fill
    started: bool
    fd: int


@dataclass(frozen=True)
class FromGlance:
    """Not from the cache: ``reason`` says why."""

    reason: str


Source = CachedFile | GrowingFile | FromGlance


async def open_source(store: Store, open_files: OpenFiles, fills: FillRegistry,
                      image_id: str, expected: Expected,
                      headers: Mapping[str, str]) -> Source:
    """Open what a caller Glance allowed (its request ``headers``) reads this image content
    from. An entry holding older content of the image is dropped first."""
    store.drop_other_content(image_id, expected.key)
    for _ in range(_LOOKS):  # an entry or fill can vanish between two looks
        entry = store.current_entry(image_id, expected.key)
        if entry is None:
            joined = fills.join_or_start(image_id, expected, headers)
            if isinstance(joined, Bypass):
                return FromGlance(joined.reason)
            if not isinstance(joined, Cached):
                fd = await joined.fill.open_reader()
                if fd is not None:
                    return GrowingFile(joined.fill, joined.started, fd)
                continue
            entry = joined.entry
        handle = await _open_cached(store, open_files, entry)
        if handle is not None:
            return CachedFile(entry, handle)
    return FromGlance("its cache entry changed under every look")


async def _open_cached(store: Store, open_files: OpenFiles, entry: Entry) -> OpenFile | None:
    """The entry's file, open for one reader (to give back to ``open_files``), the hit
    counted; None if the file is gone or has not the entry's size (the entry is dropped)."""
    try:
        handle = await open_files.acquire(store.data_dir, entry.file_name, entry.size)
    except OSError as exc:
        store.drop_unusable(entry, str(exc))
        return None
    if store.get(entry.image_id) is not entry:
        # Dropped while its file was being opened: this reader finishes, no other starts.
        open_files.retire(entry.file_name)
    store.record_hit(entry)
    return handle
