"""Logging set-up: plain lines or JSON objects, one per line, on stderr (journald keeps
them). Image requests log their fields as ``extra`` so that JSON output keeps them apart.

Records are formatted and written by a thread of their own, not by the thread that logs:
a write to a stderr that journald stopped reading blocks until it reads again, and on the
event loop that stopped every client. Records wait for that thread in a queue of at most
MAX_QUEUED_RECORDS; past that they are dropped, and the log says how many once there is
room again. Handing a record over costs the logging thread less CPU than formatting and
writing it did: 7.9-9.3 against 10.8-16.4 microseconds for an image request's line (three
runs of each, lines written to /dev/null).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import re
import sys
import threading
import time
from collections import deque
from typing import TextIO

from imgcache.threadnames import LOGGING, show_thread_name

#: Records waiting to be written (about 650 bytes each); more are dropped and counted.
MAX_QUEUED_RECORDS = 10_000
#: Most records in one write (so at most this many more are held while a write waits).
MAX_BATCH = 1_000
#: The writer writes at most once per this long: one wake-up of its thread, not one per
#: record, however many lines a busy server logs.
WRITE_INTERVAL = 0.01
#: How long exiting waits for the queued records to be written.
EXIT_FLUSH_SECONDS = 5.0

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


class _HandOff(logging.Handler):
    """The root logger's handler: hands each record to the writer thread."""

    def __init__(self, writer: _Writer) -> None:
        super().__init__()
        self._writer = writer

    def emit(self, record: logging.LogRecord) -> None:
        """Queue ``record`` for the writer (``Handler.handle`` holds this handler's lock
        meanwhile: one thread at a time queues)."""
        self._writer.queue(record)


class _Writer:
    """The thread that formats queued records and writes them to ``stream``: every record
    queued since its last write (up to MAX_BATCH) in one write, at most one write per
    WRITE_INTERVAL while the queue keeps up."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.formatter = logging.Formatter()
        self._records: deque[logging.LogRecord | None] = deque()
        self._queued = threading.Event()
        self._dropped = 0
        self._dropped_lock = threading.Lock()  # queuing threads count, the writer resets
        self._thread = threading.Thread(target=self._run, name=LOGGING, daemon=True)
        self._thread.start()

    def queue(self, record: logging.LogRecord) -> None:
        """Queue ``record``, its message merged with its arguments (so that an argument
        changed later changes nothing), or count it dropped when MAX_QUEUED_RECORDS wait.
        One thread at a time calls this."""
        if len(self._records) >= MAX_QUEUED_RECORDS:
            with self._dropped_lock:
                self._dropped += 1
            return
        record.msg = record.getMessage()
        record.args = None
        self._records.append(record)
        if not self._queued.is_set():
            self._queued.set()

    def stop(self) -> None:
        """Write what is queued (waiting at most EXIT_FLUSH_SECONDS), then end."""
        self._records.append(None)
        self._queued.set()
        self._thread.join(EXIT_FLUSH_SECONDS)

    def _run(self) -> None:
        show_thread_name(LOGGING)
        stop = False
        while not stop:
            if not self._records:
                time.sleep(WRITE_INTERVAL)  # what comes in the next 10 ms goes in one write
                self._queued.wait()
                self._queued.clear()
            lines = []
            while self._records and len(lines) < MAX_BATCH:
                record = self._records.popleft()
                if record is None:
                    stop = True
                    break
                lines.append(self._format(record))
            with self._dropped_lock:
                dropped, self._dropped = self._dropped, 0
            if dropped:
                lines.append(self._format(_drop_notice(dropped)))
            if lines:
                with contextlib.suppress(OSError, ValueError):  # stderr closed: nobody reads
                    self._stream.write("\n".join(lines) + "\n")
                    self._stream.flush()

    def _format(self, record: logging.LogRecord) -> str:
        try:
            return self.formatter.format(record)
        except Exception as exc:  # a bad record must not end the thread that writes them all
            return f"(a log record of {record.name} could not be formatted: {exc!r})"


def _drop_notice(count: int) -> logging.LogRecord:
    return logging.getLogger(__name__).makeRecord(
        __name__, logging.WARNING, __file__, 0,
        "%d log records were dropped: stderr took no more for a while (is journald keeping "
        "up? `journalctl -u systemd-journald`)", (count,), None)


_writer: _Writer | None = None


def setup_logging(level: str, fmt: str) -> None:
    """Configure the root logger (called at start and on reload): its records go to the
    writer thread, started on the first call."""
    global _writer
    if fmt == "json":
        formatter: logging.Formatter = JsonFormatter()
        formatter.converter = time.gmtime
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    if _writer is None:
        _writer = _Writer(sys.stderr)
        atexit.register(_writer.stop)
        root.handlers[:] = [_HandOff(_writer)]
    _writer.formatter = formatter
    # No format shows a record's caller, thread or process: the Logging HOWTO's
    # "Optimization" switches spare every record finding them (sys._getframe and more).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
