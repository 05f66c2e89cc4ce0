"""The access history's files (standard library only, so the CLI reads them fast): the
record format, the two bounded files, and the server's state written beside them.

``current.bin`` and ``previous.bin``: a 32-byte header (magic, version, record size), then
32-byte little-endian records. ``state.json``: the cap and pinned images at the last write.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAGIC = b"IMGCACHE-HISTORY"
VERSION = 1
#: File header: magic, version, record size, then zeros to 32 bytes.
HEADER = struct.Struct("<16sII8x")
#: One request: image size (bytes), image id (16 bytes of its UUID), time (Unix seconds),
#: result code (index in RESULT_CODES), 3 spare bytes.
RECORD = struct.Struct("<Q16sIB3x")
#: Result codes of the records, in file order; ``denied`` is never recorded.
RESULT_CODES = ("hit", "miss", "coalesced", "bypass", "error")
CURRENT = "current.bin"
PREVIOUS = "previous.bin"
#: The server's cap and pinned images, rewritten with each flush, for sizing a stopped server.
STATE = "state.json"

@dataclass(frozen=True)
class ServerState:
    """What sizing needs from the server besides the requests: its cap and pinned images."""

    max_bytes: int
    pinned: Mapping[str, int]  # image id -> size

    def as_json(self) -> dict[str, Any]:
        """The state.json document."""
        return {"max_bytes": self.max_bytes, "pinned": dict(self.pinned)}


def read_state(directory: Path) -> ServerState | None:
    """The state a server last wrote to ``directory``; None if absent or unreadable."""
    try:
        raw = json.loads((directory / STATE).read_text())
        return ServerState(int(raw["max_bytes"]),
                           {str(k): int(v) for k, v in raw["pinned"].items()})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def history_files(directory: Path) -> list[Path]:
    """The history files of ``directory``, oldest first."""
    return [directory / PREVIOUS, directory / CURRENT]


def check_header(path: Path) -> str | None:
    """Why ``path`` is not a history file this version can read (None when it is)."""
    with path.open("rb") as handle:
        head = handle.read(HEADER.size)
    if len(head) < HEADER.size:
        return "it is shorter than a header"
    magic, version, record_size = HEADER.unpack(head)
    if magic != MAGIC:
        return "it does not start with the history header"
    if version != VERSION or record_size != RECORD.size:
        return f"it is version {version} with {record_size}-byte records"
    return None
