"""Everything that is not an image-data GET reaches Glance unchanged and comes back streamed."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
from inloop import TOKEN, Imgcache, ImgcacheFactory
from yarl import URL

from imgcache.standin import GlanceStandin

MiB = 1 << 20


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS",
                                    "PROPFIND"])
async def test_method_path_query_headers_and_body_arrive_unchanged(
    glance: GlanceStandin, imgcache: Imgcache, method: str
) -> None:
    body = b"x" * 1000 if method not in ("GET", "OPTIONS") else b""
    headers = {
        "X-Auth-Token": TOKEN,
        "X-OpenStack-Request-ID": "req-1234",
        "User-Agent": "python-glanceclient",
        "Content-Type": "application/openstack-images-v2.1-json-patch",
        "X-Custom": "kept",
        "Connection": "keep-alive, X-Dropped-Hop",
        "X-Dropped-Hop": "hop-by-hop, named by Connection",
    }
    url = URL(f"{imgcache.url}/_standin/echo?a=1&b=%2Fx&a=2", encoded=True)
    async with imgcache.session.request(method, url, headers=headers, data=body) as resp:
        assert resp.status == 200
        echoed = await resp.json()
    assert echoed["method"] == method
    assert echoed["path_qs"] == "/_standin/echo?a=1&b=%2Fx&a=2"
    got = {k.lower(): v for k, v in echoed["headers"].items()}
    for name in ("X-Auth-Token", "X-OpenStack-Request-ID", "User-Agent", "Content-Type",
                 "X-Custom"):
        assert got[name.lower()] == headers[name]
    assert "x-dropped-hop" not in got
    assert echoed["body_bytes"] == len(body)
    assert echoed["body_sha256"] == hashlib.sha256(body).hexdigest()


async def test_glance_status_and_headers_come_back_as_they_are(
    glance: GlanceStandin, imgcache: Imgcache
) -> None:
    async with imgcache.session.get(f"{imgcache.url}/v2/images/nope",
                                    headers={"X-Auth-Token": TOKEN}) as resp:
        assert resp.status == 404
        assert "x-openstack-request-id" in resp.headers
        await resp.read()
    async with imgcache.session.get(f"{imgcache.url}/v2/images") as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"].startswith("Keystone uri=")
    image = await glance.add_image(size=MiB)
    async with imgcache.session.head(imgcache.data_url(image.id),
                                     headers={"X-Auth-Token": TOKEN}) as resp:
        assert resp.status == 405


async def test_image_metadata_and_list_pass_through(
    glance: GlanceStandin, imgcache: Imgcache
) -> None:
    image = await glance.add_image(size=MiB)
    async with imgcache.session.get(f"{imgcache.url}/v2/images/{image.id}",
                                    headers={"X-Auth-Token": TOKEN}) as resp:
        assert resp.status == 200
        assert (await resp.json())["os_hash_value"] == image.os_hash_value
    async with imgcache.session.get(f"{imgcache.url}/v2/images",
                                    headers={"X-Auth-Token": TOKEN}) as resp:
        assert [i["id"] for i in (await resp.json())["images"]] == [image.id]


async def test_upload_then_download_through_imgcache(
    glance: GlanceStandin, imgcache: Imgcache
) -> None:
    headers = {"X-Auth-Token": TOKEN, "Content-Type": "application/json"}
    async with imgcache.session.post(f"{imgcache.url}/v2/images", headers=headers,
                                     data=json.dumps({"name": "up"})) as resp:
        assert resp.status == 201
        image_id = (await resp.json())["id"]
    size = 24 * MiB
    digest = hashlib.sha512()

    async def body() -> AsyncIterator[bytes]:
        for i in range(size // MiB):
            chunk = bytes([i % 251]) * MiB
            digest.update(chunk)
            yield chunk

    upload_headers = {"X-Auth-Token": TOKEN, "Content-Type": "application/octet-stream"}
    async with imgcache.session.put(f"{imgcache.url}/v2/images/{image_id}/file",
                                    headers=upload_headers, data=body()) as resp:
        assert resp.status == 204
    status, cache_headers, data = await imgcache.get(image_id)
    assert status == 200 and cache_headers["X-Cache-Status"] == "MISS"
    assert hashlib.sha512(data).hexdigest() == digest.hexdigest()


async def test_large_response_streams(glance: GlanceStandin, imgcache: Imgcache) -> None:
    size = 64 * MiB
    received = 0
    async with imgcache.session.get(f"{imgcache.url}/_standin/stream?size={size}") as resp:
        assert resp.status == 200
        async for chunk in resp.content.iter_any():
            received += len(chunk)
    assert received == size


async def test_unreachable_glance_is_a_503_with_a_reason(
    imgcache_factory: ImgcacheFactory, unused_tcp_port: int
) -> None:
    imgcache = await imgcache_factory(upstream=f"http://127.0.0.1:{unused_tcp_port}")
    async with imgcache.session.get(f"{imgcache.url}/v2/images") as resp:
        assert resp.status == 503
        error = (await resp.json())["error"]
    assert "cannot connect to Glance" in error["message"]
    status, _, body = await imgcache.get("8b4f3b3c-9f4e-4c1a-9a57-0d1f2a3b4c5d")
    assert status == 503 and b"cannot connect" in body


async def test_a_second_upstream_takes_over_when_the_first_is_down(
    glance: GlanceStandin, imgcache_factory: ImgcacheFactory, unused_tcp_port: int
) -> None:
    imgcache = await imgcache_factory(
        upstream=f"http://127.0.0.1:{unused_tcp_port},{glance.url}")
    image = await glance.add_image(size=MiB)
    status, _headers, body = await imgcache.get(image.id)
    assert status == 200 and hashlib.sha512(body).hexdigest() == image.os_hash_value
    metrics = await imgcache.metrics()
    assert metrics['imgcache_upstream_errors_total{kind="connect"}'] >= 1


async def test_silent_glance_is_a_504(imgcache_factory: ImgcacheFactory) -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # read nothing, answer nothing

    silent = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    try:
        imgcache = await imgcache_factory(upstream=f"http://127.0.0.1:{port}",
                                          read_timeout="0.5s")
        async with imgcache.session.get(f"{imgcache.url}/v2/images") as resp:
            assert resp.status == 504
            assert "did not answer in time" in (await resp.json())["error"]["message"]
    finally:
        for writer in accepted:
            writer.close()
        silent.close()
        await silent.wait_closed()


async def test_upstream_breaking_mid_response_is_not_a_clean_end(
    glance: GlanceStandin, imgcache_factory: ImgcacheFactory
) -> None:
    # A download too big to cache streams from Glance; with retries off a reset cannot heal.
    imgcache = await imgcache_factory(max_size="1M", retries="0")
    image = await glance.add_image(size=4 * MiB)
    from imgcache.standin import Fault

    glance.faults[image.id] = Fault(reset_at=MiB)
    with pytest.raises(aiohttp.ClientPayloadError):
        await imgcache.get(image.id)
