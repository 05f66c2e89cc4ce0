"""Glance's cache API in imgcache's own loop (blockbuster watching it), in front of the
Glance stand-in: the answers that need no Keystone, Keystone's URL taken from Glance's 401,
and the API turned off. Keystone's answers are proven against a real Keystone in
tests/interop/test_interop_cache_api.py."""

from __future__ import annotations

import socket

from inloop import TOKEN, Imgcache, ImgcacheFactory

from imgcache.standin import KEYSTONE_URI, GlanceStandin


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_no_token_is_401_and_keystone_comes_from_glances_401(
        glance: GlanceStandin, imgcache: Imgcache) -> None:
    async with imgcache.session.get(imgcache.url + "/v2/cache") as response:
        assert response.status == 401
        assert "X-Auth-Token" in (await response.json())["error"]["message"]
    # The stand-in names a Keystone that is not there: imgcache found it, could not reach it.
    async with imgcache.session.get(imgcache.url + "/v2/cache",
                                    headers={"X-Auth-Token": TOKEN}) as response:
        assert response.status == 503
        message = (await response.json())["error"]["message"]
    assert KEYSTONE_URI.rstrip("/") in message and "[cache_api] keystone_url" in message
    async with imgcache.session.get(imgcache.url + "/v2/cache") as response:
        assert response.headers["WWW-Authenticate"] == \
            f'Keystone uri="{KEYSTONE_URI.rstrip("/")}"'
    for bad in ("tok en", "x" * 9000):
        async with imgcache.session.get(imgcache.url + "/v2/cache",
                                        headers={"X-Auth-Token": bad}) as response:
            assert response.status == 401


async def test_keystone_unreachable_is_503_naming_the_option(
        imgcache_factory: ImgcacheFactory) -> None:
    nowhere = f"http://127.0.0.1:{closed_port()}"
    server: Imgcache = await imgcache_factory(keystone_url=nowhere)
    for method, path in (("GET", "/v2/cache"), ("PUT", "/v2/cache/x"), ("DELETE", "/v2/cache")):
        async with server.session.request(method, server.url + path,
                                          headers={"X-Auth-Token": TOKEN}) as response:
            assert response.status == 503, (method, path)
            assert nowhere in (await response.json())["error"]["message"]
    assert server.services.prefetcher.jobs() == []


async def test_empty_roles_pass_the_cache_api_to_glance(
        glance: GlanceStandin, imgcache_factory: ImgcacheFactory) -> None:
    server: Imgcache = await imgcache_factory(cache_api_roles="")
    async with server.session.get(server.url + "/v2/cache",
                                  headers={"X-Auth-Token": TOKEN}) as response:
        assert response.status == 404  # the stand-in's answer: it has no such route
    assert any(r.path == "/v2/cache" for r in glance.requests)
