"""The Glance stand-in, driven over real loopback HTTP with a real aiohttp client."""

import hashlib
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

from imgcache.standin import CHUNK, Fault, GlanceStandin, StandinImage, pseudo_random_bytes

SIZE = 3 * CHUNK + 12345  # several chunks and a ragged tail
AUTH = {"X-Auth-Token": "token-a"}
OTHER = {"X-Auth-Token": "token-b"}


@pytest.fixture
async def standin(tmp_path) -> AsyncIterator[GlanceStandin]:
    server = GlanceStandin(tmp_path / "glance", tokens=["token-a", "token-b"])
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def image(standin: GlanceStandin) -> StandinImage:
    return await standin.add_image(size=SIZE, owner_tokens=["token-a"])


def file_url(standin: GlanceStandin, image: StandinImage) -> str:
    return f"{standin.url}/v2/images/{image.id}/file"


def expected(image: StandinImage) -> bytes:
    return b"".join(pseudo_random_bytes(image.id, SIZE))


async def test_full_download_headers_and_hashes(standin, client, image):
    async with client.get(file_url(standin, image), headers=AUTH) as resp:
        body = await resp.read()
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "application/octet-stream"
    assert resp.headers["Content-Length"] == str(SIZE)
    assert resp.headers["Content-MD5"] == hashlib.md5(body).hexdigest()
    assert resp.headers["x-openstack-request-id"].startswith("req-")
    for absent in ("ETag", "Last-Modified", "Cache-Control", "Content-Range", "Accept-Ranges"):
        assert absent not in resp.headers
    assert body == expected(image)

    async with client.get(f"{standin.url}/v2/images/{image.id}", headers=AUTH) as resp:
        doc = await resp.json()
    assert resp.status == 200
    assert doc["size"] == SIZE and doc["status"] == "active"
    assert doc["checksum"] == hashlib.md5(body).hexdigest()
    assert doc["os_hash_algo"] == "sha512"
    assert doc["os_hash_value"] == hashlib.sha512(body).hexdigest()
    assert doc["file"] == f"/v2/images/{image.id}/file"
    assert doc["disk_format"] == "raw" and doc["container_format"] == "bare"


async def test_image_from_bytes_without_hashes(standin, client):
    img = await standin.add_image(b"hello", hash_algo=None, checksum=False)
    async with client.get(f"{standin.url}/v2/images/{img.id}", headers=AUTH) as resp:
        doc = await resp.json()
    assert (doc["checksum"], doc["os_hash_algo"], doc["os_hash_value"]) == (None, None, None)
    async with client.get(file_url(standin, img), headers=AUTH) as resp:
        assert await resp.read() == b"hello"
        assert "Content-MD5" not in resp.headers


async def test_meta_size_overrides_metadata_only(standin, client, image):
    image.meta_size = SIZE + 1
    async with client.get(f"{standin.url}/v2/images/{image.id}", headers=AUTH) as resp:
        assert (await resp.json())["size"] == SIZE + 1
    async with client.get(file_url(standin, image), headers=AUTH) as resp:
        assert len(await resp.read()) == SIZE


@pytest.mark.parametrize(
    ("header", "first", "last"),
    [
        ("bytes=0-9", 0, 9),
        ("bytes=100-", 100, SIZE - 1),
        ("bytes=-7", SIZE - 7, SIZE - 1),
        ("bytes=-999999999", 0, SIZE - 1),
        (f"bytes={SIZE - 3}-{SIZE * 2}", SIZE - 3, SIZE - 1),  # end clamped
    ],
)
async def test_range_206(standin, client, image, header, first, last):
    async with client.get(file_url(standin, image), headers={**AUTH, "Range": header}) as resp:
        body = await resp.read()
    assert resp.status == 206
    assert resp.headers["Content-Range"] == f"bytes {first}-{last}/{SIZE}"
    assert resp.headers["Content-MD5"] == image.checksum  # still the whole image's
    assert body == expected(image)[first : last + 1]


@pytest.mark.parametrize(
    ("header", "status"),
    [
        ("bytes=0-1,5-6", 400),
        ("bytes=abc", 416),
        ("bytes=", 416),
        ("items=0-1", 416),
        ("bytes=9-5", 416),
        ("bytes=-0", 416),
        (f"bytes={SIZE}-", 416),
    ],
)
async def test_range_errors(standin, client, image, header, status):
    async with client.get(file_url(standin, image), headers={**AUTH, "Range": header}) as resp:
        assert resp.status == status


async def test_store_without_range_support(standin, client, image):
    standin.faults[image.id] = Fault(ranges_supported=False)
    async with client.get(file_url(standin, image), headers={**AUTH, "Range": "bytes=0-"}) as r:
        assert r.status == 400
    async with client.get(file_url(standin, image), headers=AUTH) as resp:
        assert resp.status == 200


async def test_auth(standin, client, image):
    meta = f"{standin.url}/v2/images/{image.id}"
    async with client.get(meta) as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == 'Keystone uri="http://127.0.0.1:5000"'
        assert (await resp.json())["error"]["code"] == 401
    async with client.get(meta, headers={"X-Auth-Token": "bogus"}) as resp:
        assert resp.status == 401
    for url in (meta, file_url(standin, image)):  # private image, other token: 404, not 403
        async with client.get(url, headers=OTHER) as resp:
            assert resp.status == 404
    async with client.get(f"{standin.url}/v2/images", headers=OTHER) as resp:
        assert (await resp.json())["images"] == []
    image.visibility = "public"
    async with client.get(file_url(standin, image), headers=OTHER) as resp:
        assert resp.status == 200
    async with client.get(f"{standin.url}/v2/images/{'0' * 8}", headers=AUTH) as resp:
        assert resp.status == 404


async def test_statuses_head_and_unknown_paths(standin, client, image):
    async with client.head(file_url(standin, image), headers=AUTH) as resp:
        assert resp.status == 405
    image.status = "queued"
    async with client.get(file_url(standin, image), headers=AUTH) as resp:
        assert resp.status == 204
    image.status = "deactivated"
    async with client.get(file_url(standin, image), headers=AUTH) as resp:
        assert resp.status == 403
    async with client.get(f"{standin.url}/v1/whatever") as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == 404
    async with client.get(f"{standin.url}/v2/schemas/image", headers=AUTH) as resp:
        assert (await resp.json())["name"] == "image"


async def test_corrupt_at_flips_exactly_one_byte(standin, client, image):
    standin.faults[image.id] = Fault(corrupt_at=CHUNK + 5)
    async with client.get(file_url(standin, image), headers=AUTH) as resp:
        body = await resp.read()
    good = expected(image)
    assert len(body) == SIZE
    assert [i for i in range(SIZE) if body[i] != good[i]] == [CHUNK + 5]


async def test_reset_at_breaks_the_body(standin, client, image):
    standin.faults[image.id] = Fault(reset_at=CHUNK + 100)
    received = 0
    with pytest.raises(aiohttp.ClientPayloadError):
        async with client.get(file_url(standin, image), headers=AUTH) as resp:
            assert resp.status == 200
            async for chunk in resp.content.iter_any():
                received += len(chunk)
    assert received == CHUNK + 100


async def test_status_fault_applies_times(standin, client, image):
    standin.faults[image.id] = Fault(status=503, times=1)
    async with client.get(file_url(standin, image), headers=AUTH) as resp:
        assert resp.status == 503
    assert image.id not in standin.faults
    async with client.get(file_url(standin, image), headers=AUTH) as resp:
        assert resp.status == 200
        assert len(await resp.read()) == SIZE


async def test_delays_and_trickle(standin, client, image):
    standin.faults[image.id] = Fault(first_byte_delay=0.2, rate=400_000)
    start = time.monotonic()
    headers = {**AUTH, "Range": "bytes=0-99999"}
    async with client.get(file_url(standin, image), headers=headers) as resp:
        assert len(await resp.read()) == 100_000
    assert time.monotonic() - start >= 0.2 + 0.2  # delay, then 100 kB at 400 kB/s

    standin.faults[image.id] = Fault(stall_at=10, stall_seconds=30)
    timeout = aiohttp.ClientTimeout(sock_read=0.3)
    with pytest.raises(TimeoutError):
        async with client.get(file_url(standin, image), headers=AUTH, timeout=timeout) as resp:
            await resp.read()


async def test_upload_then_download(standin, client):
    async with client.post(f"{standin.url}/v2/images", headers=AUTH, json={"name": "up"}) as r:
        assert r.status == 201
        doc = await r.json()
    assert (doc["status"], doc["size"], doc["os_hash_value"]) == ("queued", None, None)
    url = f"{standin.url}/v2/images/{doc['id']}/file"

    parts = [bytes([i]) * 100_003 for i in range(10)]

    async def body() -> AsyncIterator[bytes]:
        for part in parts:
            yield part

    headers = {**AUTH, "Content-Type": "application/octet-stream"}
    async with client.put(url, headers=headers, data=body()) as resp:
        assert resp.status == 204
    data = b"".join(parts)
    async with client.get(f"{standin.url}/v2/images/{doc['id']}", headers=AUTH) as resp:
        doc = await resp.json()
    assert doc["status"] == "active" and doc["size"] == len(data)
    assert doc["os_hash_value"] == hashlib.sha512(data).hexdigest()
    assert doc["checksum"] == hashlib.md5(data).hexdigest()
    async with client.get(url, headers=AUTH) as resp:
        assert await resp.read() == data
    async with client.put(url, headers=headers, data=b"again") as resp:
        assert resp.status == 409  # active images are immutable

    async with client.delete(f"{standin.url}/v2/images/{doc['id']}", headers=AUTH) as resp:
        assert resp.status == 204
    async with client.get(url, headers=AUTH) as resp:
        assert resp.status == 404


async def test_data_gets_and_request_log(standin, client, image):
    for headers in (AUTH, OTHER, {**AUTH, "Range": "bytes=0-0"}):
        async with client.get(file_url(standin, image), headers=headers) as resp:
            await resp.read()
    async with client.get(f"{standin.url}/v2/images/{image.id}", headers=AUTH) as resp:
        await resp.read()
    assert standin.data_gets(image.id) == 2
    assert standin.download_checks(image.id) == 1  # the one-byte GET
    assert standin.data_gets("nope") == 0
    logged = [(r.method, r.status, r.body_bytes_sent) for r in standin.requests]
    assert logged[:3] == [("GET", 200, SIZE), ("GET", 404, logged[1][2]), ("GET", 206, 1)]
    assert standin.requests[3].path == f"/v2/images/{image.id}"
    assert standin.requests[0].headers["X-Auth-Token"] == "token-a"


async def test_echo_and_stream(standin, client):
    payload = b"x" * (CHUNK * 2 + 7)
    url = f"{standin.url}/_standin/echo?a=1&b=%20"
    async with client.patch(url, data=payload, headers={"X-Thing": "yes"}) as resp:
        echo = await resp.json()
    assert echo["method"] == "PATCH"
    assert echo["path_qs"] == "/_standin/echo?a=1&b=%20"
    assert echo["headers"]["X-Thing"] == "yes"
    assert echo["body_bytes"] == len(payload)
    assert echo["body_sha256"] == hashlib.sha256(payload).hexdigest()
    assert standin.requests[-1].body_bytes_received == len(payload)

    size = 5 * CHUNK + 3
    async with client.get(f"{standin.url}/_standin/stream?size={size}&seed=s") as resp:
        body = await resp.read()
    assert resp.headers["Content-Length"] == str(size)
    assert body == b"".join(pseudo_random_bytes("s", size))
    assert len({body[i : i + CHUNK] for i in range(0, 5 * CHUNK, CHUNK)}) == 5
