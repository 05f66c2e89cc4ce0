"""Logging set-up: plain lines or JSON objects, one per line, on stderr (journald keeps
them). Image requests log their fields as ``extra`` so that JSON output keeps them apart."""

from __future__ import annotations

import json
import logging
import re
import sys
import time

#: Fields an image-request log record carries (see handlers.ImageDataRequest).
REQUEST_FIELDS = ("request_id", "image_id", "result", "status", "bytes", "duration")

#: What a value from a request may show of itself in a log line as it is.
_SHOWN_AS_IS = re.compile(r"[^A-Za-z0-9_.:/%-]")


def log_safe(text: str) -> str:
    """``text`` from a request (a path, an id) for a log line: every character that could
    change the line's fields (a space, a quote, a control character, a backslash) escaped as
    ``\\xNN``, ``\\uNNNN`` or ``\\UNNNNNNNN``, so that no client can add to the line."""
    return _SHOWN_AS_IS.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    code = ord(match[0])
    return (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000
            else f"\\U{code:08x}")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message and request fields."""

    def format(self, record: logging.LogRecord) -> str:
        """Serialize a record; exceptions go in an ``exception`` field."""
        doc: dict[str, object] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in REQUEST_FIELDS:
            if hasattr(record, name):
                doc[name] = getattr(record, name)
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def setup_logging(level: str, fmt: str) -> None:
    """Configure the root logger (called at start and on reload)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        formatter: logging.Formatter = JsonFormatter()
        formatter.converter = time.gmtime
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler.setFormatter(formatter)
    # No format shows a record's caller, thread or process: the Logging HOWTO's
    # "Optimization" switches spare every record finding them (sys._getframe and more).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
