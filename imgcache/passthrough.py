"""Everything that is not served from the cache goes to Glance as it came: any method,
bodies streamed both ways (a 20 GB snapshot upload is never buffered), hop-by-hop headers
dropped, the rest kept, and Glance's answer streamed back as it is."""

from __future__ import annotations

import logging
from collections.abc import Callable

import aiohttp
from aiohttp import web

from imgcache.logs import log_safe
from imgcache.metrics import Metrics
from imgcache.responses import ClientGone, reset_connection
from imgcache.upstream import Upstream, end_to_end_headers

log = logging.getLogger(__name__)

_PASS_CHUNK = 256 * 1024


async def pass_through(upstream: Upstream, metrics: Metrics, request: web.Request,
                       cache_status: str | None = None,
                       on_sent: Callable[[int], None] | None = None) -> web.StreamResponse:
    """Forward the request to Glance and stream the answer back, bodies never buffered
    whole. ``cache_status`` adds an X-Cache-Status header (image-data requests Glance
    answers itself, which go through ``[upstream] proxy`` when one is set); ``on_sent``
    counts the body bytes sent. A body that breaks off ends the client's connection with a
    reset, never a clean end."""
    answer = await forward(upstream, metrics, request, image_data=cache_status is not None)
    return await relay(upstream, metrics, request, answer, cache_status, on_sent)


async def forward(upstream: Upstream, metrics: Metrics, request: web.Request, *,
                  image_data: bool) -> aiohttp.ClientResponse:
    """Send the request to Glance as it came (its body streamed); Glance's answer, its body
    not read yet."""
    metrics.passthrough_requests.inc()
    body = request.content if request.body_exists else None
    return await upstream.request(request.method, request.raw_path, request.headers,
                                  data=body, image_data=image_data)


async def relay(upstream: Upstream, metrics: Metrics, request: web.Request,
                answer: aiohttp.ClientResponse, cache_status: str | None = None,
                on_sent: Callable[[int], None] | None = None) -> web.StreamResponse:
    """Stream Glance's ``answer`` back to the client (see pass_through), and release it."""
    try:
        response = web.StreamResponse(status=answer.status, reason=answer.reason)
        response.headers.extend(end_to_end_headers(answer.headers))
        if cache_status:
            response.headers["X-Cache-Status"] = cache_status
        if answer.content_length is not None:
            response.content_length = answer.content_length
        await response.prepare(request)
        try:
            async for chunk in answer.content.iter_chunked(_PASS_CHUNK):
                if cache_status:
                    metrics.upstream_bytes.inc(len(chunk))
                await response.write(chunk)
                if on_sent is not None:
                    on_sent(len(chunk))
        except ClientGone:  # the client went away: routine, nothing to report
            log.debug("%s %s: the client went away mid-body", request.method,
                      log_safe(request.path))
            reset_connection(request)
            return response
        except Exception as exc:
            # The status line is gone: all that is left is not to end the body cleanly.
            log.warning("%s %s: %s; resetting the client connection", request.method,
                        log_safe(request.path), upstream.broken(exc, "a pass-through"))
            reset_connection(request)
            return response
        await response.write_eof()
        return response
    finally:
        answer.release()
