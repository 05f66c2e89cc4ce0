"""Log lines written by a thread of their own, not by the threads that log: a write to a
stderr that journald stopped reading blocks until it reads again, and on the event loop
that stopped every client. The thread that logs only resolves the record (its message, and
a snapshot of its exception) and queues it.

At most MAX_QUEUED_RECORDS wait; past that records are dropped and counted
(``LogWriter.dropped_total``, the metric ``imgcache_log_records_dropped_total``), and a line
saying how many were dropped takes their place in the log: before the next record queued,
or once the queue is written out if none comes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import time
import traceback
from collections import deque

from imgcache.threadnames import LOGGING, show_thread_name

#: Records waiting to be written (about 0.9 KB for an image request's, a few KB with a
#: traceback); more are dropped and counted.
MAX_QUEUED_RECORDS = 10_000
#: Most records in one write: while it waits, at most this many more are held.
MAX_BATCH = 1_000
#: Pause after each write: what is logged meanwhile goes in the next write, and the thread
#: wakes at most this often however busy the server (and formatting a backlog after stderr
#: stalled leaves the event loop the interpreter between batches).
WRITE_INTERVAL = 0.01
#: How long stopping waits for the queued records to be written.
EXIT_FLUSH_SECONDS = 5.0

#: Where a record's exception waits, as a traceback.TracebackException (no frames kept).
_SNAPSHOT = "imgcache_exception"


class LogWriter:
    """The thread that formats queued log records with ``formatter`` (swapped on reload)
    and writes them to ``fd``, every record queued since its last write (up to MAX_BATCH)
    in one write."""

    def __init__(self, fd: int | None, formatter: logging.Formatter) -> None:
        self._fd = fd  # None: there is nowhere to write, every record is counted dropped
        self.formatter = formatter
        self._records: deque[logging.LogRecord | None] = deque()
        self._queued = threading.Event()
        self._lock = threading.Lock()  # the drop counts, and stopping
        self._unreported = 0  # dropped since the last notice was queued
        self._dropped_total = 0
        self._stopped = False
        self._writing = False  # a batch taken from the queue is being written
        self._thread = threading.Thread(target=self._run, name=LOGGING, daemon=True)
        self._thread.start()

    @property
    def dropped_total(self) -> int:
        """Records dropped since start: the queue was full, or writing them failed."""
        return self._dropped_total

    def queue(self, record: logging.LogRecord) -> None:
        """Resolve ``record`` (see ``_resolve``) and queue it, or count it dropped. Never
        raises."""
        _resolve(record)
        with self._lock:
            if self._stopped or len(self._records) >= MAX_QUEUED_RECORDS:
                self._count_dropped(1)
                return
            if self._unreported:
                self._records.append(_drop_notice(self._unreported))
                self._unreported = 0
            self._records.append(record)
        if not self._queued.is_set():
            self._queued.set()

    def flush(self, seconds: float) -> None:
        """Wait, at most ``seconds``, until what is queued now has been written (before a
        line written to stderr directly, which would pass it)."""
        deadline = time.monotonic() + seconds
        while (self._records or self._writing) and time.monotonic() < deadline:
            time.sleep(WRITE_INTERVAL)

    def stop(self) -> None:
        """Write what is queued, waiting at most EXIT_FLUSH_SECONDS, then end; records
        logged after this are counted dropped."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            if self._unreported:
                self._records.append(_drop_notice(self._unreported))
                self._unreported = 0
            self._records.append(None)
        self._queued.set()
        self._thread.join(EXIT_FLUSH_SECONDS)

    def _count_dropped(self, count: int) -> None:
        """Called with ``_lock`` held."""
        self._unreported += count
        self._dropped_total += count

    def _run(self) -> None:
        show_thread_name(LOGGING)
        while True:
            if not self._records:
                with self._lock:  # records were dropped, and none queued since: say so now
                    if self._unreported:
                        self._records.append(_drop_notice(self._unreported))
                        self._unreported = 0
            if not self._records:
                self._queued.wait()
                self._queued.clear()
                continue  # the deque is checked again after each clear: no wake-up is lost
            lines, stop = [], False
            self._writing = True
            while self._records and len(lines) < MAX_BATCH:
                record = self._records.popleft()
                if record is None:
                    stop = True
                    break
                lines.append(self._format(record))
            if lines:
                self._write(lines)
            self._writing = False
            if stop:
                return
            time.sleep(WRITE_INTERVAL)

    def _format(self, record: logging.LogRecord) -> str:
        snapshot = record.__dict__.pop(_SNAPSHOT, None)
        try:
            if snapshot is not None:
                record.exc_text = "".join(snapshot.format()).rstrip("\n")
            return self.formatter.format(record)
        except Exception as exc:  # a bad record must not end the thread that writes them all
            return (f"(a log record of {record.name} could not be formatted: {exc!r}; its "
                    f"message: {str(record.msg)[:500]!r})")

    def _write(self, lines: list[str]) -> None:
        """Write ``lines`` whole, waiting for a full stderr; count those a write error lost
        (the next notice says how many)."""
        data = memoryview(("\n".join(lines) + "\n").encode("utf-8", "backslashreplace"))
        written = 0
        try:
            if self._fd is None:
                raise OSError("no stderr to write to")
            while written < len(data):
                try:
                    written += os.write(self._fd, data[written:])
                except BlockingIOError:  # stderr is non-blocking: wait for room
                    poller = select.poll()
                    poller.register(self._fd, select.POLLOUT)
                    poller.poll()
        except OSError:
            with self._lock:
                self._count_dropped(bytes(data[written:]).count(b"\n"))


def _resolve(record: logging.LogRecord) -> None:
    """Make ``record`` independent of the moment it was logged, in place: its message
    merged with its arguments (an argument changed later changes nothing), its exception
    kept as a snapshot without frames (a traceback would keep every frame's locals alive,
    receive buffers among them, for as long as the record waits). Never raises: a message
    that cannot be merged becomes a line saying so."""
    try:
        record.msg = record.getMessage()
    except Exception as exc:
        record.msg = (f"(a log message of {record.name} could not be formatted: {exc!r}; "
                      f"the message: {str(record.msg)[:500]!r})")
    record.args = None
    if record.exc_info:
        kind, value, trace = record.exc_info
        record.exc_info = None
        if value is not None:
            with contextlib.suppress(Exception):  # then the line goes without it
                record.__dict__[_SNAPSHOT] = traceback.TracebackException(
                    kind, value, trace, lookup_lines=False)


def _drop_notice(count: int) -> logging.LogRecord:
    return logging.getLogger(__name__).makeRecord(
        __name__, logging.WARNING, __file__, 0,
        "log records dropped: %d (stderr took no more for a while, or writing to it "
        "failed; is journald keeping up? `journalctl -u systemd-journald`)", (count,), None)


class QueueingHandler(logging.Handler):
    """The root logger's handler: hands each record to a LogWriter."""

    def __init__(self, writer: LogWriter) -> None:
        super().__init__()
        self._writer = writer

    def emit(self, record: logging.LogRecord) -> None:
        """Queue ``record`` for the writer."""
        self._writer.queue(record)
