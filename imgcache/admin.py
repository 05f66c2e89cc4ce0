"""The management API: JSON over HTTP on a local unix socket, for the ``imgcache`` CLI.

Never on a TCP port. The socket's file mode (and optional group) decides who may connect,
and each connection's peer credentials are checked again: only root, the server's own
user and members of the configured group are served.
"""

from __future__ import annotations

import asyncio
import grp
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from aiohttp import web

from imgcache.config import parse_duration, parse_size
from imgcache.errors import BadRequest, ImgcacheError, NoSpace
from imgcache.handlers import SERVICES, Services
from imgcache.keys import parse_image_id
from imgcache.predictions import Predictions, SizingFailed

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_PREDICTIONS = web.AppKey("predictions", Predictions)


def create_admin_app(services: Services, predictions: Predictions,
                     allowed_gid: int | None) -> web.Application:
    """The management app over the running proxy's services."""
    app = web.Application(middlewares=[_peer_check(allowed_gid), _errors])
    app[SERVICES] = services
    app[_PREDICTIONS] = predictions
    routes = [
        web.get("/v1/entries", list_entries),
        web.delete("/v1/entries", clear_entries),
        web.delete("/v1/entries/{image_id}", evict_entry),
        web.post("/v1/prefetch", prefetch),
        web.get("/v1/queue", queue),
        web.post("/v1/pin/{image_id}", pin),
        web.post("/v1/unpin/{image_id}", unpin),
        web.post("/v1/verify", verify),
        web.get("/v1/verify/{run_id}", verify_run),
        web.get("/v1/stats", stats),
        web.get("/v1/sizing", sizing),
    ]
    app.add_routes(routes)
    return app


def peer_uid_gid(transport: asyncio.BaseTransport | None) -> tuple[int, int] | None:
    """The (uid, gid) of the process at the other end of a unix socket connection."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, gid = struct.unpack("3i", creds)
    return uid, gid


def _peer_check(allowed_gid: int | None) -> Any:
    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        peer = peer_uid_gid(request.transport)
        if peer is None or not _peer_allowed(*peer, allowed_gid):
            log.warning("management request refused for peer uid/gid %s", peer)
            return web.json_response({"error": "not allowed: run imgcache as root, as the "
                                      "server's user, or as a member of its socket group"},
                                     status=403)
        return await handler(request)

    return check


def _peer_allowed(uid: int, gid: int, allowed_gid: int | None) -> bool:
    if uid in (0, os.getuid()):
        return True
    if allowed_gid is None:
        return False
    if gid == allowed_gid:
        return True
    try:
        import pwd

        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        return False
    return user in grp.getgrgid(allowed_gid).gr_mem


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ImgcacheError as exc:
        return web.json_response({"error": str(exc)}, status=exc.status)
    except NoSpace as exc:
        return web.json_response({"error": str(exc)}, status=409)


def _services(request: web.Request) -> Services:
    return request.app[SERVICES]


async def _json_body(request: web.Request) -> dict[str, Any]:
    if not request.body_exists:
        return {}
    try:
        body = await request.json()
    except ValueError as exc:
        raise BadRequest("the request body is not JSON") from exc
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


def _ids(body: dict[str, Any]) -> list[str]:
    raw = body.get("image_ids", [])
    if not isinstance(raw, list) or not all(isinstance(i, str) for i in raw):
        raise BadRequest("image_ids must be a list of image ids")
    return [parse_image_id(i) for i in raw]


def _token(body: dict[str, Any]) -> str:
    token = body.get("token")
    if not isinstance(token, str) or not token:
        raise BadRequest("a token is needed: Glance authorizes prefetches like any download "
                         "(--token or OS_AUTH_TOKEN)")
    return token


async def list_entries(request: web.Request) -> web.Response:
    """Every cached image, least recently used first."""
    store = _services(request).store
    return web.json_response({"entries": [asdict(e) for e in store.entries()]})


async def clear_entries(request: web.Request) -> web.Response:
    """Evict every unpinned entry (``?pinned=1``: pinned ones too)."""
    store = _services(request).store
    with_pinned = request.query.get("pinned") in ("1", "true", "yes")
    removed = store.remove_many([e.image_id for e in store.entries()
                                 if with_pinned or not e.pinned])
    for entry in removed:
        _services(request).authorizer.forget(entry.image_id)
    kept = len(store)
    log.info("management: cleared %d entries (%d pinned kept)", len(removed), kept)
    return web.json_response({"removed": len(removed), "kept_pinned": kept})


async def evict_entry(request: web.Request) -> web.Response:
    """Evict one entry, pinned or not."""
    image_id = parse_image_id(request.match_info["image_id"])
    services = _services(request)
    if services.store.remove(image_id) is None:
        raise ImgcacheError(f"image {image_id} is not cached", status=404)
    services.authorizer.forget(image_id)
    log.info("management: evicted %s", image_id)
    return web.json_response({"evicted": image_id})


async def prefetch(request: web.Request) -> web.Response:
    """Queue images to fill in the background."""
    body = await _json_body(request)
    ids = _ids(body)
    if not ids:
        raise BadRequest("give at least one image id")
    jobs = _services(request).prefetcher.submit(ids, _token(body), bool(body.get("pin")))
    return web.json_response({"jobs": [job.describe() for job in jobs]}, status=202)


async def queue(request: web.Request) -> web.Response:
    """Prefetch jobs and every fill in flight, with progress."""
    services = _services(request)
    fills = [{"image_id": f.image_id, "size": f.expected.size, "written": f.written,
              "verified": f.verified} for f in services.fills.in_flight()]
    jobs = [job.describe() for job in services.prefetcher.jobs()]
    return web.json_response({"fills": fills, "jobs": jobs})


async def pin(request: web.Request) -> web.Response:
    """Pin a cached image; an uncached one is prefetched and pinned (needs a token)."""
    image_id = parse_image_id(request.match_info["image_id"])
    services = _services(request)
    if services.store.get(image_id) is not None:
        entry = services.store.set_pinned(image_id, True)
        log.info("management: pinned %s", image_id)
        return web.json_response({"pinned": asdict(entry)})
    body = await _json_body(request)
    [job] = services.prefetcher.submit([image_id], _token(body), pin=True)
    return web.json_response({"jobs": [job.describe()]}, status=202)


async def unpin(request: web.Request) -> web.Response:
    """Let an image be evicted again."""
    image_id = parse_image_id(request.match_info["image_id"])
    try:
        entry = _services(request).store.set_pinned(image_id, False)
    except KeyError:
        raise ImgcacheError(f"image {image_id} is not cached", status=404) from None
    log.info("management: unpinned %s", image_id)
    return web.json_response({"unpinned": asdict(entry)})


async def verify(request: web.Request) -> web.Response:
    """Start re-hashing cached files (all, or the given ids) in the background; corrupt
    ones are evicted. The answer names the run, whose progress ``/v1/verify/{id}`` gives."""
    services = _services(request)
    ids = _ids(await _json_body(request))
    entries = services.store.entries() if not ids else [
        e for i in ids if (e := services.store.get(i)) is not None]
    cached = {e.image_id for e in entries}
    run = services.verifier.start_run(entries, [i for i in ids if i not in cached])
    return web.json_response({"run": run.describe()}, status=202)


async def verify_run(request: web.Request) -> web.Response:
    """Progress and results of a verification run."""
    try:
        run = _services(request).verifier.run(int(request.match_info["run_id"]))
    except ValueError:
        run = None
    if run is None:
        raise ImgcacheError("no such verification run (only the last 10 are kept)",
                            status=404)
    return web.json_response({"run": run.describe()})


async def stats(request: web.Request) -> web.Response:
    """Size, cap, entries, hit ratio and bytes saved since start."""
    services = _services(request)
    registry = services.metrics.registry

    def sample(name: str, **labels: str) -> float:
        return registry.get_sample_value(name, labels) or 0.0

    served = {r: sample("imgcache_served_bytes_total", result=r)
              for r in ("hit", "miss", "coalesced", "bypass")}
    requests = {r: sample("imgcache_requests_total", result=r)
                for r in ("hit", "miss", "coalesced", "bypass")}
    answered = sum(requests.values())
    store = services.store
    return web.json_response({
        "cache_bytes": store.used_bytes, "max_bytes": store.max_bytes,
        "pinned_bytes": store.pinned_bytes, "over_cap_bytes": store.over_cap_bytes,
        "entries": len(store),
        "fills_in_progress": len(services.fills.in_flight()),
        "requests": requests,
        "hit_ratio": (requests["hit"] / answered) if answered else None,
        "bytes_served": sum(served.values()),
        "bytes_from_glance": sample("imgcache_upstream_bytes_total"),
        "bytes_saved": max(0.0, sum(served.values()) - sample("imgcache_upstream_bytes_total")),
    })


async def sizing(request: web.Request) -> web.Response:
    """Predicted hit ratios per cap from the access history (``?caps=10G,20G``,
    ``&since=7d``, ``&policies=1``); 503 when the sizing extra is not installed."""
    try:
        caps = [parse_size(c) for c in request.query["caps"].split(",")] \
            if request.query.get("caps") else None
        since = parse_duration(request.query["since"]) if request.query.get("since") \
            else None
    except ValueError as exc:
        raise BadRequest(f"caps are sizes such as 10G and since a duration such as 7d: "
                         f"{exc}") from None
    if caps is not None and not all(caps):
        raise BadRequest("a cap must be more than 0 bytes")
    try:
        answer = await request.app[_PREDICTIONS].size(
            caps, since, request.query.get("policies") in ("1", "true", "yes"))
    except SizingFailed as exc:
        return web.json_response({"error": str(exc)},
                                 status=503 if exc.missing_extra else 500)
    return web.json_response(answer)


async def bind_admin_socket(path: Path, mode: int, group: str) -> int | None:
    """Prepare the socket's directory, refuse to steal a live socket, remove a stale one.
    Returns the gid of ``group`` (None when empty). Runs the file calls off the loop."""
    gid = None
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise ImgcacheError(f"[admin] socket_group: no group named {group!r}") from None
    await asyncio.to_thread(_prepare_socket_path, path)
    return gid


def _prepare_socket_path(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
    if not path.exists():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()  # left by a process that is gone
        return
    finally:
        probe.close()
    raise ImgcacheError(f"another imgcache is serving the management socket {path}; "
                        "stop it or set [admin] socket to another path")


def set_socket_access(path: Path, mode: int, gid: int | None) -> None:
    """Runs on a thread after binding: the socket's mode and group."""
    os.chmod(path, mode)
    if gid is not None:
        os.chown(path, -1, gid)
