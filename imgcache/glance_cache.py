"""Glance's own cache API (Image API v2.14) on imgcache's listener, so that ``glance
cache-*`` and ``openstack image cache *`` manage a node's imgcache as they manage Glance's
cache:

- ``GET /v2/cache``: cached and queued images;
- ``PUT /v2/cache/{id}``: queue an image and start caching it at once (202);
- ``DELETE /v2/cache/{id}``: drop it from the cache and the queue (204);
- ``DELETE /v2/cache``: clear the cache, the queue or both
  (``x-image-cache-clear-target: cache | queue``, absent for both);
- ``GET /v2/cache/nodes/{id}``: Glance's answer for a cache that is not centralized (409).

Only callers whose Keystone token holds one of ``[cache_api] roles`` get in (``keystone``);
queued images are downloaded by the prefetcher with the caller's token, so Glance
authorizes them like any download. Pinned images stay through a clear (``imgcache unpin``
or ``imgcache clear --pinned`` remove them), not through a delete of their id.

glanceclient checks ``GET /versions`` for v2.14 before each call: the versions document
passed through from Glance gets that entry when Glance's own lacks it (a Glance without its
own cache does not list it).
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from aiohttp import web

from imgcache.authorize import Denied
from imgcache.config import format_size
from imgcache.errors import BadRequest, ImgcacheError
from imgcache.handlers import SERVICES, Services, dispatch, error_response
from imgcache.keys import parse_image_id
from imgcache.keystone import Caller, Forbidden, KeystoneRoles, NotAuthenticated
from imgcache.logs import log_safe
from imgcache.upstream import end_to_end_headers

log = logging.getLogger("imgcache.cache_api")

#: The Image API version that brought the cache API.
CACHE_API_VERSION = "2.14"
CLEAR_TARGET_HEADER = "x-image-cache-clear-target"
_MAX_VERSIONS_BYTES = 1 << 20
_IMAGE = re.compile(r"^/([^/]+)$")
_NODES = re.compile(r"^/nodes/([^/]+)$")


class MethodNotAllowed(ImgcacheError):
    """The path exists, not for this method (405); ``allow`` lists the methods it takes."""

    status = 405

    def __init__(self, allow: str) -> None:
        super().__init__(f"use {allow} here")
        self.allow = allow


class NotFound(ImgcacheError):
    """No such image, or no such path under /v2/cache (404)."""

    status = 404


class Conflict(ImgcacheError):
    """The request cannot be carried out in the image's or the cache's state (409)."""

    status = 409


def _version_number(entry: Any) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in str(entry["id"]).lstrip("v").split("."))
    except (KeyError, TypeError, ValueError):
        return ()


def with_cache_api_version(doc: Any) -> Any:
    """Glance's versions document with a SUPPORTED v2.14 entry added (links copied from its
    v2 entries) when it lacks one; anything that is not such a document is returned as is."""
    versions = doc.get("versions") if isinstance(doc, dict) else None
    if not isinstance(versions, list):
        return doc
    wanted = tuple(int(p) for p in CACHE_API_VERSION.split("."))
    if any(_version_number(v) == wanted for v in versions):
        return doc
    v2 = [v for v in versions if isinstance(v, dict) and _version_number(v)[:1] == (2,)]
    if not v2:
        return doc
    entry = {"id": f"v{CACHE_API_VERSION}", "status": "SUPPORTED",
             "links": v2[0].get("links", [])}
    older = next((i for i, v in enumerate(versions) if () < _version_number(v) < wanted),
                 len(versions))
    return {**doc, "versions": [*versions[:older], entry, *versions[older:]]}


class CacheApi:
    """Serves the cache API and the versions document that advertises it."""

    def __init__(self, roles: KeystoneRoles) -> None:
        self.roles = roles

    async def serve_versions(self, request: web.Request) -> web.StreamResponse:
        """``GET /`` and ``GET /versions``: Glance's answer, with v2.14 listed."""
        if not request.raw_path.startswith("/"):
            return await dispatch(request)
        services = request.app[SERVICES]
        services.metrics.passthrough_requests.inc()
        try:
            upstream = await services.upstream.request("GET", request.raw_path,
                                                       request.headers)
            try:
                body = await services.upstream.read_body(upstream, _MAX_VERSIONS_BYTES,
                                                         "the versions document")
            finally:
                upstream.release()
        except ImgcacheError as exc:
            return error_response(exc)
        headers = end_to_end_headers(upstream.headers)
        if "Content-Encoding" not in headers and upstream.status in (200, 300):
            try:
                doc = json.loads(body)
            except ValueError:
                doc = None
            if doc is not None and (changed := with_cache_api_version(doc)) is not doc:
                body = json.dumps(changed).encode()
                headers.popall("Content-MD5", None)
        headers.popall("Content-Length", None)
        return web.Response(status=upstream.status, reason=upstream.reason, headers=headers,
                            body=body)

    async def serve(self, request: web.Request) -> web.StreamResponse:
        """Everything under ``/v2/cache``: the caller's roles first, then the call."""
        if not request.raw_path.startswith("/"):
            return await dispatch(request)
        services = request.app[SERVICES]
        what = f"{request.method} {log_safe(request.path[:120])}"
        caller: Caller | None = None
        try:
            caller = await self.roles.require(request.headers)
            response = await self._route(services, request, caller)
        except Denied as denied:  # Glance's answer about the image, passed on
            denied.headers.popall("Content-Length", None)
            response = web.Response(status=denied.status, headers=denied.headers,
                                    body=denied.body)
        except ImgcacheError as exc:
            response = error_response(exc)
            if isinstance(exc, Forbidden):
                caller = exc.caller
            if isinstance(exc, NotAuthenticated) and self.roles.known_url:
                response.headers["WWW-Authenticate"] = f'Keystone uri="{self.roles.known_url}"'
            if isinstance(exc, MethodNotAllowed):
                response.headers["Allow"] = exc.allow
        who = caller.describe() if caller else "a caller Keystone did not identify"
        log.info("cache API: %s by %s: %d", what, who, response.status)
        return response

    async def _route(self, services: Services, request: web.Request,
                     caller: Caller) -> web.StreamResponse:
        tail = request.match_info.get("tail", "")
        method = request.method
        if tail in ("", "/"):
            if method == "GET":
                return web.json_response(self._state(services))
            if method == "DELETE":
                return self._clear(services, request, caller)
            raise MethodNotAllowed("GET, DELETE")
        if match := _NODES.match(tail):
            if method != "GET":
                raise MethodNotAllowed("GET")
            _image_id(match.group(1))
            raise Conflict("Centralized caching is not enabled: imgcache is the cache of "
                           "this node only, and knows no other node's")
        if match := _IMAGE.match(tail):
            image_id = _image_id(match.group(1))
            if method == "PUT":
                return await self._queue(services, request, image_id, caller)
            if method == "DELETE":
                return await self._delete(services, request, image_id, caller)
            raise MethodNotAllowed("PUT, DELETE")
        raise NotFound(f"no such resource under /v2/cache: {request.path[:120]}")

    @staticmethod
    def _state(services: Services) -> dict[str, Any]:
        cached = [{"image_id": e.image_id, "hits": e.hits, "last_accessed": e.last_access,
                   "last_modified": e.created_at, "size": e.size}
                  for e in services.store.entries()]
        in_cache = {e["image_id"] for e in cached}
        queued = [i for i in services.prefetcher.pending_ids() if i not in in_cache]
        return {"cached_images": cached, "queued_images": queued}

    @staticmethod
    async def _queue(services: Services, request: web.Request, image_id: str,
                     caller: Caller) -> web.StreamResponse:
        # Glance's answer to the caller's own credentials: 404 for an image it cannot see.
        info = await services.authorizer.authorize(image_id, request.headers)
        if info.status != "active":
            raise BadRequest("Only images with status active can be targeted for queueing "
                             f"(image {image_id} is {info.status})")
        if info.expected is None:
            raise BadRequest(f"image {image_id} has no data to cache")
        store = services.store
        if info.expected.size > store.max_bytes:
            raise Conflict(f"image {image_id} ({format_size(info.expected.size)}) is larger "
                           f"than the cache cap ([cache] max_size, "
                           f"{format_size(store.max_bytes)}): it cannot be cached here")
        if (store.current_entry(image_id, info.expected.key) is None
                and image_id not in services.prefetcher.pending_ids()):
            services.prefetcher.submit([image_id], request.headers["X-Auth-Token"])
            log.info("cache API: %s queued %s for caching", caller.describe(), image_id)
        return web.Response(status=202)

    @staticmethod
    async def _delete(services: Services, request: web.Request, image_id: str,
                      caller: Caller) -> web.StreamResponse:
        withdrawn = services.prefetcher.withdraw(image_id)
        removed = services.store.remove(image_id)
        services.authorizer.forget(image_id)
        if removed is None and not withdrawn:
            # As Glance does: 204 for an image that exists though not cached, else its 404.
            await services.authorizer.authorize(image_id, request.headers)
        else:
            log.info("cache API: %s deleted %s from the cache (%s) and the queue (%d jobs)",
                     caller.describe(), image_id, "cached" if removed else "not cached",
                     withdrawn)
        return web.Response(status=204)

    @staticmethod
    def _clear(services: Services, request: web.Request,
               caller: Caller) -> web.StreamResponse:
        target = request.headers.get(CLEAR_TARGET_HEADER, "").strip().lower()
        if target not in ("", "cache", "queue"):
            raise BadRequest(f"If provided '{CLEAR_TARGET_HEADER}' must be 'cache', 'queue' "
                             "or empty string.")
        withdrawn = removed = kept = 0
        if target in ("", "queue"):
            withdrawn = services.prefetcher.withdraw()
        if target in ("", "cache"):
            entries = services.store.entries()
            kept = sum(e.pinned for e in entries)
            evicted = services.store.remove_many([e.image_id for e in entries if not e.pinned])
            for entry in evicted:
                services.authorizer.forget(entry.image_id)
            removed = len(evicted)
        log.info("cache API: %s cleared %s: %d images evicted (%d pinned kept), %d queued "
                 "jobs withdrawn", caller.describe(), target or "the cache and the queue",
                 removed, kept, withdrawn)
        return web.Response(status=204)


def _image_id(raw: str) -> str:
    """A canonical image id; Glance answers 404 for an id that is not one of its UUIDs."""
    try:
        return parse_image_id(raw)
    except BadRequest:
        raise NotFound(f"Image {raw[:64]} not found.") from None


CACHE_API = web.AppKey("cache_api", CacheApi)


async def serve_cache_api(request: web.Request) -> web.StreamResponse:
    """The route handler of ``/v2/cache[/...]``."""
    return await request.app[CACHE_API].serve(request)


async def serve_versions(request: web.Request) -> web.StreamResponse:
    """The route handler of ``GET /`` and ``GET /versions``."""
    return await request.app[CACHE_API].serve_versions(request)
