"""Image ids: validation and the names they get on disk.

Only canonical UUIDs are accepted, so an id can never name a path outside the cache
directory, whatever a client puts in the URL.
"""

from __future__ import annotations

import re

from imgcache.errors import BadRequest

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def parse_image_id(raw: str) -> str:
    """Return the image id if it is a UUID (8-4-4-4-12 hex, as Glance makes them), else
    raise BadRequest; the result is lower-case and safe to use in a file name."""
    image_id = raw.lower()
    if not _UUID.fullmatch(image_id):
        raise BadRequest(f"image id must be a UUID like 8-4-4-4-12 hex digits, got {raw[:64]!r}")
    return image_id


def data_file_name(image_id: str, generation: int) -> str:
    """The file name of a committed entry: the id plus a generation number (a timestamp in
    ns), so that a new commit never reuses the name of an entry still being deleted."""
    return f"{image_id}.{generation:x}"


def partial_file_name(image_id: str, attempt: int) -> str:
    """The file name of an in-progress fill; ``attempt`` keeps concurrent generations apart."""
    return f"{image_id}.{attempt}.partial"


def data_path(image_id: str) -> str:
    """Glance's path of an image's data, for the canonical id (a client may have spelled
    it in another case, which a Glance on PostgreSQL would not find)."""
    return f"/v2/images/{image_id}/file"
