"""Log lines written by a thread of their own, not by the threads that log: a write to a
stderr that journald stopped reading blocks until it reads again, and on the event loop
that stopped every client. The thread that logs only resolves the record (its message, and
a snapshot of its exception) and queues it.

At most MAX_QUEUED_RECORDS wait; past that records are dropped and counted
(``LogWriter.dropped_total``, the metric ``imgcache_log_records_dropped_total``), and a line
saying how many were dropped takes their place in the log: before the next record queued,
or once the queue is written out if none comes. Records lost to a failed write count the
same way. The handler must be the last to see a record: it resolves the record in place.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
import traceback
from collections import deque

from imgcache.threadnames import LOGGING, show_thread_name

#: Records waiting to be written (about 0.9 KB for an image request's); more are dropped
#: and counted.
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

#: What the queue holds: a record, the count of a drop notice, or the end mark (None).
_Queued = logging.LogRecord | int | None


class LogWriter:
    """The thread that formats queued log records with ``formatter`` (swapped on reload)
    and writes them to ``fd`` (None: nowhere; every record is counted dropped), every
    record queued since its last write (up to MAX_BATCH) in one write."""

    def __init__(self, fd: int | None, formatter: logging.Formatter) -> None:
        self._fd = fd
        self.formatter = formatter
        self._records: deque[_Queued] = deque()
        self._queued = threading.Event()
        # Guards the counts and the end. Reentrant: a finalizer run by a garbage collection
        # on this thread may log while it is held.
        self._lock = threading.RLock()
        self._unreported = 0  # dropped since the last notice was queued
        self._dropped_total = 0
        self._stopped = fd is None
        self._writing = False  # a batch taken from the queue is being written
        self._last_write_failed = False
        self._line_open = False  # a partial write left a line without its end
        self._thread = threading.Thread(target=self._run, name=LOGGING, daemon=True)
        if fd is not None:
            self._thread.start()

    @property
    def dropped_total(self) -> int:
        """Records dropped since start: the queue was full, or writing them failed."""
        return self._dropped_total

    def queue(self, record: logging.LogRecord) -> None:
        """Resolve ``record`` (see ``_resolve``) and queue it, or count it dropped; once
        the writer has ended, write it at once. Never raises."""
        if self._stopped or len(self._records) >= MAX_QUEUED_RECORDS:
            self._dropped_or_written_now(record)
            return
        _resolve(record)
        with self._lock:
            if self._stopped or len(self._records) >= MAX_QUEUED_RECORDS:
                self._count_dropped(1)
                return
            self._queue_notice()
            self._records.append(record)
        if not self._queued.is_set():
            self._queued.set()

    def flush(self, seconds: float) -> None:
        """Wait, at most ``seconds``, until the queue is written out, a drop notice
        included (before a line written to stderr directly, which would pass them)."""
        deadline = time.monotonic() + seconds
        while (self._records or self._writing or self._unreported) and (
                self._thread.is_alive() and time.monotonic() < deadline):
            time.sleep(WRITE_INTERVAL)

    def stop(self) -> None:
        """Write what is queued, waiting at most EXIT_FLUSH_SECONDS, then end; records
        logged after this are written at once if the writer ended, else counted."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            self._queue_notice()
            self._records.append(None)
        self._queued.set()
        self._thread.join(EXIT_FLUSH_SECONDS)

    def _queue_notice(self) -> None:
        """Queue the count of the records dropped since the last notice, if any; called
        with ``_lock`` held."""
        if self._unreported:
            self._records.append(self._unreported)
            self._unreported = 0

    def _count_dropped(self, count: int) -> None:
        with self._lock:
            self._unreported += count
            self._dropped_total += count

    def _dropped_or_written_now(self, record: logging.LogRecord) -> None:
        """A record the queue cannot take: written at once when the writer has ended
        (exit is under way: blocking is harmless, losing it is not), else counted."""
        if self._fd is None or not self._stopped or self._thread.is_alive():
            self._count_dropped(1)
            return
        _resolve(record)
        self._write([record])

    def _run(self) -> None:
        show_thread_name(LOGGING)
        try:
            while self._write_next_batch():
                time.sleep(WRITE_INTERVAL)
        except BaseException as exc:  # the thread must not end unsaid: the counts go on
            self._stopped = True
            self._writing = False
            self._write_raw(f"imgcache: the log writer failed ({exc!r}); further log lines "
                            "are dropped and counted in imgcache_log_records_dropped_total; "
                            "restart imgcache to log again\n".encode())
            self._count_dropped(len(self._records))
            self._records.clear()

    def _write_next_batch(self) -> bool:
        """Wait for records, write a batch; False once the end mark is reached."""
        if not self._records and not self._last_write_failed:
            with self._lock:  # records were dropped, and none queued since: say so now
                self._queue_notice()
        while not self._records:
            self._queued.wait()
            self._queued.clear()  # the deque is checked again after: no wake-up is lost
        batch: list[logging.LogRecord | int] = []
        self._writing = True
        try:
            while self._records and len(batch) < MAX_BATCH:
                entry = self._records.popleft()
                if entry is None:
                    self._write(batch)
                    return False
                batch.append(entry)
            self._write(batch)
        finally:
            self._writing = False
        return True

    def _write(self, batch: list[logging.LogRecord | int]) -> None:
        """Write ``batch`` whole, waiting for a full stderr; on a failed write, count the
        records whose lines did not all go out (a notice's count goes back to be said
        again)."""
        if not batch:
            return
        pieces, ends, offset = [], [], 0
        if self._line_open:  # the last write broke off mid-line: end that line first
            pieces.append(b"\n")
            offset = 1
        for entry in batch:
            piece = (self._format(entry) + "\n").encode("utf-8", "backslashreplace")
            pieces.append(piece)
            offset += len(piece)
            ends.append(offset)
        data = memoryview(b"".join(pieces))
        written = self._write_raw(data)
        self._line_open = 0 < written < len(data) and data[written - 1:written] != b"\n"
        self._last_write_failed = written < len(data)
        lost_records = lost_notices = 0
        for entry, end in zip(batch, ends, strict=True):
            if end > written:
                if isinstance(entry, int):
                    lost_notices += entry
                else:
                    lost_records += 1
        if lost_records or lost_notices:
            with self._lock:
                self._unreported += lost_notices
                self._count_dropped(lost_records)

    def _write_raw(self, data: bytes | memoryview) -> int:
        """Write ``data`` to the fd, waiting while it is full; how many bytes went out
        before a write failed (all, if none did)."""
        written = 0
        if self._fd is None:
            return 0
        try:
            while written < len(data):
                try:
                    written += os.write(self._fd, data[written:])
                except BlockingIOError:  # stderr is non-blocking: wait for room
                    poller = select.poll()
                    poller.register(self._fd, select.POLLOUT)
                    poller.poll()
        except OSError:
            pass
        return written

    def _format(self, entry: logging.LogRecord | int) -> str:
        record = _drop_notice(entry) if isinstance(entry, int) else entry
        snapshot = record.__dict__.pop(_SNAPSHOT, None)
        try:
            if snapshot is not None:
                record.exc_text = "".join(snapshot.format()).rstrip("\n")
            return self.formatter.format(record)
        except Exception as exc:  # a bad record must not end the thread that writes them all
            return (f"(a log record of {record.name} could not be formatted: {exc!r}; its "
                    f"message: {_text_of(record.msg)[:500]!r})")


def _resolve(record: logging.LogRecord) -> None:
    """Make ``record`` independent of the moment it was logged, in place: its message
    merged with its arguments (an argument changed later changes nothing), its exception
    kept as a snapshot without frames (a traceback would keep every frame's locals alive,
    receive buffers among them, for as long as the record waits). Never raises: a message
    that cannot be merged, or an exception that cannot be captured, becomes a line saying
    so."""
    try:
        record.msg = record.getMessage()
    except Exception as exc:
        record.msg = (f"(a log message of {record.name} could not be formatted: {exc!r}; "
                      f"the message: {_text_of(record.msg)[:500]!r})")
    record.args = None
    if record.exc_info:
        kind, value, trace = record.exc_info
        record.exc_info = None
        if value is not None:
            try:
                record.__dict__[_SNAPSHOT] = traceback.TracebackException(
                    kind, value, trace, lookup_lines=False, compact=True)
            except Exception as exc:
                record.exc_text = f"(its traceback could not be captured: {exc!r})"


def _text_of(value: object) -> str:
    """``str(value)``, or a repr that cannot fail when that raises."""
    try:
        return str(value)
    except Exception:
        return object.__repr__(value)


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
