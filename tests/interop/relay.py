"""A TCP relay that can hold large responses: slotted between imgcache and Glance, it keeps a
cache fill in flight for as long as a test needs (Glance itself is too fast). It listens where
it is told (the far end of the test network) and reaches Glance on loopback."""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
import time
from collections.abc import Callable

CHUNK = 64 * 1024


class Relay:
    """Relays every connection made to ``listener`` (a listening socket; by default a new one
    on ``host``, which names it in ``url`` either way) to ``127.0.0.1:target_port``.

    While ``hold()`` is in force, an answer stops being relayed once more than ``threshold``
    bytes of it have gone through (metadata answers are far smaller and pass); ``release()``
    lets it go on. Requests always pass."""

    def __init__(self, target_port: int, threshold: int = 1 << 20,
                 listener: socket.socket | None = None, host: str = "127.0.0.1") -> None:
        self.target_port = target_port
        self.threshold = threshold
        self._listener = listener or socket.create_server((host, 0))
        self.port: int = self._listener.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self._open = threading.Event()
        self._open.set()
        self._changed = threading.Condition()
        self._held = 0
        self._closed = False
        self._sockets: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._spawn(self._accept)

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._changed:
                if self._closed:
                    client.close()
                    upstream.close()
                    return
                self._sockets.update((client, upstream))
            self._spawn(self._relay, client, upstream)

    def _relay(self, client: socket.socket, upstream: socket.socket) -> None:
        answered = 0
        with selectors.DefaultSelector() as selector, client, upstream:
            selector.register(client, selectors.EVENT_READ, upstream)
            selector.register(upstream, selectors.EVENT_READ, client)
            try:
                while selector.get_map():
                    for key, _ in selector.select():
                        src: socket.socket = key.fileobj  # type: ignore[assignment]
                        dst: socket.socket = key.data
                        chunk = src.recv(CHUNK)
                        if not chunk:  # one side is done sending: pass that on
                            selector.unregister(src)
                            with contextlib.suppress(OSError):
                                dst.shutdown(socket.SHUT_WR)
                            continue
                        if src is upstream:
                            if answered + len(chunk) > self.threshold:
                                self._wait_open()
                            answered += len(chunk)
                        dst.sendall(chunk)
            except OSError:
                pass  # a side hung up: close both
            finally:
                with self._changed:
                    self._sockets.difference_update((client, upstream))

    def _wait_open(self) -> None:
        if self._open.is_set():
            return
        with self._changed:
            self._held += 1
            self._changed.notify_all()
        self._open.wait()
        with self._changed:
            self._held -= 1
            self._changed.notify_all()

    def hold(self) -> None:
        """Stop relaying answers past ``threshold`` bytes until ``release()``."""
        self._open.clear()

    def release(self) -> None:
        """Let held answers go on."""
        self._open.set()

    def wait_held(self, count: int = 1, timeout: float = 30) -> None:
        """Wait until ``count`` answers are held; raise TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self._held < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self._held} answers held, not {count}")
                self._changed.wait(left)

    def close(self) -> None:
        """Stop listening, release what is held and close every connection."""
        with self._changed:
            self._closed = True
            sockets = list(self._sockets)
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        self._listener.close()
        self.release()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(timeout=5)
