"""Glance's answers split across TCP segments, as they are on any real network: every read of
imgcache must take the whole message, not whatever happens to be buffered.

Over the emulated link (tests/netlink) a metadata document larger than a new connection's first
congestion window (10 segments of 1448 bytes) reaches imgcache in two flights at least one round
trip apart; over loopback (64 KiB segments) it arrives in one read, which is how a
``content.read(n)`` of the metadata passed every loopback test and answered 502 on a real
network (issue 10, defect 1: this test failed over the link, and passed over loopback, until
the metadata was read whole).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket

from inloop import TOKEN, Imgcache
from netlink.link import Network

from imgcache.standin import GlanceStandin

MiB = 1024 * 1024
#: Glance's default image_property_quota is 128 properties; values are at most 255 characters.
PROPERTIES = {f"x_site_property_{n:03d}": f"{n:03d}" * 85 for n in range(120)}


def sha512(data: bytes) -> str:
    return hashlib.sha512(data).hexdigest()


def reads_of_one_answer(host: str, port: int, path: str) -> list[int]:
    """GET ``path`` on a fresh connection; the size of every recv() its answer took."""
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nX-Auth-Token: {TOKEN}\r\n"
                     "Connection: close\r\n\r\n".encode())
        sizes = []
        while chunk := sock.recv(1 << 20):
            sizes.append(len(chunk))
        return sizes


async def test_a_metadata_document_split_across_segments_is_read_whole(
    glance: GlanceStandin, imgcache: Imgcache, network: Network
) -> None:
    image = await glance.add_image(size=MiB, properties=PROPERTIES)
    document = json.dumps(image.doc()).encode()
    assert len(document) > 2 * 10 * 1448  # more than a first flight, twice over
    if network.kind == "link":
        reads = await asyncio.to_thread(reads_of_one_answer, network.far_host, glance.port,
                                        f"/v2/images/{image.id}")
        assert len(reads) >= 2, f"the answer came in one read ({reads}): the test proves nothing"
    status, _, body = await imgcache.get(image.id)
    assert status == 200, body[:300]
    assert sha512(body) == image.os_hash_value
