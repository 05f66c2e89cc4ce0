"""A raw-socket HTTP/1.1 client that tells how a response ended: a TCP reset, a clean close
(FIN), or a complete body. aiohttp's client raises the same error for both kinds of broken
ends, and a client that does not count bytes against Content-Length (the bug this guards
against) takes a clean close after a short body for a whole image; so the tests look at
the wire itself."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass

#: How a response ended.
RESET = "reset"  # ECONNRESET: the server ended the connection with RST
CLOSED = "closed"  # a clean end of stream (FIN) before Content-Length bytes arrived
COMPLETE = "complete"  # Content-Length bytes arrived


@dataclass(frozen=True)
class RawResponse:
    """What arrived: the status, the head's headers (lower-case names), the body bytes and
    how it ended."""

    status: int
    headers: dict[str, str]
    body: bytes
    ending: str


def _read_response(host: str, port: int, path: str, headers: dict[str, str],
                   timeout: float) -> RawResponse:
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: close",
                 *(f"{k}: {v}" for k, v in headers.items()), "", ""]
        sock.sendall("\r\n".join(lines).encode())
        received = bytearray()
        ending = CLOSED
        while True:
            try:
                chunk = sock.recv(1 << 20)
            except ConnectionResetError:
                ending = RESET
                break
            if not chunk:
                break
            received += chunk
    finally:
        sock.close()
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    fields = dict(line.split(":", 1) for line in header_lines if ":" in line)
    parsed = {k.strip().lower(): v.strip() for k, v in fields.items()}
    length = parsed.get("content-length")
    if ending == CLOSED and length is not None and len(body) == int(length):
        ending = COMPLETE
    return RawResponse(int(status_line.split()[1]), parsed, body, ending)


async def raw_get(url: str, path: str, headers: dict[str, str],
                  timeout: float = 60) -> RawResponse:
    """GET ``path`` from the server at ``url`` (http://HOST:PORT) on a socket of its own, in
    a thread (the socket calls block), and read until the connection ends."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return await asyncio.to_thread(_read_response, host.strip("[]"), int(port), path,
                                   headers, timeout)
