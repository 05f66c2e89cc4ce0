"""A dependency-free client of systemd's notification protocol (sd_notify(3)).

Under ``Type=notify`` systemd starts imgcache with ``NOTIFY_SOCKET`` set and waits for
``READY=1`` before it calls the service started (and before units ordered after it start);
with ``WatchdogSec=`` it also sets ``WATCHDOG_USEC`` and restarts a service that stops sending
``WATCHDOG=1`` in time. Outside systemd none of these variables is set and every call here
does nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


class SystemdNotifier:
    """Tells systemd how the service is doing: ready, stopping, a status line, and alive.

    Built from the environment systemd gives a ``Type=notify`` service: ``NOTIFY_SOCKET``
    (a datagram socket's path, or ``@name`` for the abstract namespace), ``WATCHDOG_USEC`` and
    ``WATCHDOG_PID``. Every method is a no-op without ``NOTIFY_SOCKET``, so the server calls
    them unconditionally. Messages go out as non-blocking datagrams; a failed send is logged
    once and never raised: a lost notification must not take the server down.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = _socket_address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog_interval = _watchdog_interval(env) if self.address else None
        self._sock: socket.socket | None = None
        self._failed = False

    @property
    def enabled(self) -> bool:
        """Whether systemd asked for notifications (NOTIFY_SOCKET names a usable socket)."""
        return self.address is not None

    def ready(self, status: str = "serving") -> None:
        """Say start-up is complete (``READY=1``) with a status line: under ``Type=notify``
        systemd holds the unit in "activating", and units ordered after it, until then."""
        self._send(f"READY=1\nSTATUS={_one_line(status)}")

    def stopping(self, status: str = "stopping") -> None:
        """Say the service is shutting down (``STOPPING=1``), so that systemd shows
        "deactivating" rather than a failure while connections drain."""
        self._send(f"STOPPING=1\nSTATUS={_one_line(status)}")

    def status(self, text: str) -> None:
        """Set the free-form status line ``systemctl status imgcache`` shows."""
        self._send(f"STATUS={_one_line(text)}")

    async def watchdog(self) -> None:
        """Send ``WATCHDOG=1`` now and then every half of ``WATCHDOG_USEC`` until cancelled,
        so that systemd restarts a server whose event loop has hung (it stops pinging).

        Returns at once when no watchdog is asked for: no NOTIFY_SOCKET, WATCHDOG_USEC unset
        or 0, or WATCHDOG_PID naming another process (the variables were inherited)."""
        interval = self.watchdog_interval
        if interval is None:
            return
        while True:
            self._send("WATCHDOG=1")
            await asyncio.sleep(interval)

    def close(self) -> None:
        """Close the notification socket (a later message opens it again)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _send(self, message: str) -> None:
        if self.address is None:
            return
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.setblocking(False)
            self._sock.sendto(message.encode(), self.address)
        except OSError as exc:
            if not self._failed:
                self._failed = True
                log.warning("could not notify systemd at %r (%s); further failures are "
                            "not logged", self.address, exc)


def _socket_address(value: str) -> str | bytes | None:
    """NOTIFY_SOCKET as a ``sendto`` address: a path, or ``@name`` for the abstract namespace
    (a leading NUL byte). Anything else (unset, vsock:, a relative path) means no socket."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    if value:
        log.warning("NOTIFY_SOCKET=%r is not a unix socket address; not notifying systemd",
                    value)
    return None


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Seconds between watchdog pings (half the timeout, as sd_watchdog_enabled(3)
    advises), or None when no watchdog is asked of this process."""
    try:
        usec = int(env.get("WATCHDOG_USEC", "0"))
        pid = int(env.get("WATCHDOG_PID", "0") or "0")
    except ValueError:
        log.warning("ignoring a malformed WATCHDOG_USEC/WATCHDOG_PID")
        return None
    if usec <= 0 or (pid and pid != os.getpid()):
        return None
    return usec / 2 / 1_000_000


def _one_line(text: str) -> str:
    """A status line never spans lines: a newline would start another assignment."""
    return " ".join(text.splitlines())
