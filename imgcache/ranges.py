"""HTTP Range requests with Glance's semantics (glance/common/wsgi.py): one range only,
suffix ranges accepted, an end past the image clamped to its last byte."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from imgcache.errors import BadRequest, RangeNotSatisfiable

_SPEC = re.compile(r"^[ \t]*bytes[ \t]*=[ \t]*([0-9]*)[ \t]*-[ \t]*([0-9]*)[ \t]*$", re.IGNORECASE)
_MAX_DIGITS = 19  # beyond any file size; keeps int() of a hostile header cheap


@dataclass(frozen=True)
class ByteRange:
    """Bytes ``start`` to ``end`` (exclusive) of an image of ``size`` bytes."""

    start: int
    end: int
    size: int

    @property
    def length(self) -> int:
        """Number of bytes in the range."""
        return self.end - self.start

    @property
    def content_range(self) -> str:
        """The Content-Range header value of a 206 response."""
        return f"bytes {self.start}-{self.end - 1}/{self.size}"


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """The range a ``Range`` header asks for in an image of ``size`` bytes, None for the
    whole image. Several ranges raise BadRequest (400); a malformed range or one starting
    at or past the end raises RangeNotSatisfiable (416)."""
    if header is None:
        return None
    if "," in header:
        raise BadRequest("only one byte range per request is supported")
    match = _SPEC.match(header)
    if not match or len(match.group(1)) > _MAX_DIGITS or len(match.group(2)) > _MAX_DIGITS:
        raise RangeNotSatisfiable(f"malformed Range header {header[:100]!r}")
    first, last = match.group(1), match.group(2)
    if not first:
        if not last or int(last) == 0:
            raise RangeNotSatisfiable(f"malformed Range header {header[:100]!r}")
        return ByteRange(max(0, size - int(last)), size, size)
    start = int(first)
    end = size if not last else min(int(last) + 1, size)
    if last and int(last) < start:
        raise RangeNotSatisfiable(f"range end before its start in {header[:100]!r}")
    if start >= size:
        raise RangeNotSatisfiable(f"range starts at {start}, the image has {size} bytes")
    return ByteRange(start, end, size)


def requested_range(headers: Mapping[str, str], size: int) -> ByteRange | None:
    """The range a request asks for in an image of ``size`` bytes, None for the whole image.
    Several Range headers are refused like several ranges (400). With ``If-Range`` the whole
    image is sent (RFC 9110 section 13.1.5): Glance publishes no ETag or Last-Modified for
    image data, so no validator a client holds can match."""
    values = [value for name, value in headers.items() if name.lower() == "range"]
    if len(values) > 1:
        raise BadRequest("only one byte range per request is supported")
    if not values or any(k.lower() == "if-range" for k in headers):
        return None
    return parse_range(values[0], size)
