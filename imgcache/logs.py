"""Logging set-up: plain lines or JSON objects, one per line, on stderr (journald keeps
them), written by a thread of their own (``logwriter``). Image requests log their fields
as ``extra`` so that JSON output keeps them apart."""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import sys
import threading
import time

from imgcache.logwriter import LogWriter, QueueingHandler

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
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            doc["exception"] = record.exc_text
        return json.dumps(doc, default=str)


_writer: LogWriter | None = None


def setup_logging(level: str, fmt: str) -> None:
    """Configure the root logger (called at start and on reload): its records go to the
    writer thread, started on the first call, and so do warnings."""
    global _writer
    if fmt == "json":
        formatter: logging.Formatter = JsonFormatter()
        formatter.converter = time.gmtime
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    if _writer is None:
        _writer = LogWriter(_stderr_fd(), formatter)
        atexit.register(_writer.stop)
        root.handlers[:] = [QueueingHandler(_writer)]
        # What Python would write to stderr itself goes through the writer too.
        logging.captureWarnings(True)
        threading.excepthook = _log_thread_exception
        sys.unraisablehook = _log_unraisable
    _writer.formatter = formatter
    # No format shows a record's caller, thread or process: the Logging HOWTO's
    # "Optimization" switches spare every record finding them (sys._getframe and more).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def flush_logs(seconds: float = 1.0) -> None:
    """Wait, at most ``seconds``, for the log lines queued so far to be written: before
    writing to stderr directly."""
    if _writer is not None:
        _writer.flush(seconds)


def dropped_log_records() -> int:
    """Log records dropped since start (stderr took no more, or writing to it failed)."""
    return _writer.dropped_total if _writer is not None else 0


def _log_thread_exception(args: threading.ExceptHookArgs) -> None:
    """An exception that ended a thread (``threading.excepthook``), logged."""
    if issubclass(args.exc_type, SystemExit):
        return
    name = args.thread.name if args.thread is not None else "?"
    logging.getLogger("imgcache").error(
        "uncaught exception in thread %s", name,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def _log_unraisable(unraisable: sys.UnraisableHookArgs) -> None:
    """An exception Python could not raise (``sys.unraisablehook``: in a finalizer, most
    often), logged."""
    where = object.__repr__(unraisable.object) if unraisable.object is not None else ""
    logging.getLogger("imgcache").error(
        "%s %s", unraisable.err_msg or "Exception ignored in", where,
        exc_info=(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback))


def _stderr_fd() -> int | None:
    """A descriptor of our own for stderr (the writer's, whatever becomes of sys.stderr);
    None when the process has no stderr."""
    try:
        return os.dup(2)
    except OSError:
        return None
