"""A prefill/decode proxy for OpenAI-compatible vLLM servers (``kvtier proxy``).

Each request is sent first to a prefill instance (vLLM with ``kv_role: kv_producer``) with
``max_tokens=1`` and streaming off: it computes the prompt's KV and kvtier saves it. Then the
original request goes to a decode instance (``kv_role: kv_consumer``), which loads the prompt's KV
from kvtier instead of computing it, and its answer (streamed or not) goes back to the client.
Several prefill or decode URLs are used in turn (round robin). An upstream that cannot be reached
or times out is a 502 naming it; an upstream's own error status is passed back as it is.

No KV goes through the proxy: the two instances share it through kvtier (``kvtier serve`` on one
host, or a remote tier), keyed by the prompt's tokens.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from collections.abc import Sequence
from typing import Any

log = logging.getLogger("kvtier.proxy")

ROUTES = ("/v1/completions", "/v1/chat/completions")
# Request fields that cannot go with a 1-token, non-streamed prefill.
_PREFILL_DROP = ("stream_options", "min_tokens", "best_of")
PREFILL_HEADER = "X-Kvtier-Prefill-Seconds"  # on each answer: how long its prefill request took
# Headers passed on to the upstreams (authorization of the vLLM servers, request ids).
_PASS_HEADERS = ("authorization", "x-request-id")


def prefill_body(body: dict[str, Any]) -> dict[str, Any]:
    """The request as sent to a prefill instance: one token, one choice, not streamed."""
    out = {k: v for k, v in body.items() if k not in _PREFILL_DROP}
    out.update(max_tokens=1, stream=False, n=1)
    if "max_completion_tokens" in out:  # chat's newer name of max_tokens
        out["max_completion_tokens"] = 1
    return out


class Upstreams:
    """URLs of one kind of instance, taken in turn."""

    def __init__(self, kind: str, urls: Sequence[str]) -> None:
        if not urls:
            raise ValueError(f"no {kind} URL given")
        self.kind = kind
        self.urls = [u.rstrip("/") for u in urls]
        self._next = itertools.cycle(self.urls)

    def pick(self) -> str:
        return next(self._next)


def make_app(prefill: Sequence[str], decode: Sequence[str], timeout_s: float = 600.0):
    """The proxy's aiohttp application (``aiohttp.web.run_app`` serves it)."""
    import aiohttp
    from aiohttp import web

    prefills, decodes = Upstreams("prefill", prefill), Upstreams("decode", decode)
    stats = {"requests": 0, "prefill_errors": 0, "decode_errors": 0}

    async def start(app: web.Application) -> None:
        app["session"] = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s))

    async def stop(app: web.Application) -> None:
        await app["session"].close()

    def bad_gateway(kind: str, url: str, err: BaseException) -> web.Response:
        stats[f"{kind}_errors"] += 1
        what = "timed out" if isinstance(err, asyncio.TimeoutError) else f"unreachable ({err})"
        msg = f"kvtier proxy: {kind} instance {url} {what}"
        log.warning(msg)
        return web.json_response({"error": {"message": msg, "type": "bad_gateway", "code": 502}}, status=502)

    async def relay(request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return web.json_response({"error": {"message": "kvtier proxy: the body is not JSON", "code": 400}},
                                     status=400)
        if not isinstance(body, dict):
            return web.json_response({"error": {"message": "kvtier proxy: expected a JSON object", "code": 400}},
                                     status=400)
        stats["requests"] += 1
        session: aiohttp.ClientSession = request.app["session"]
        headers = {k: v for k, v in request.headers.items() if k.lower() in _PASS_HEADERS}
        # 1. Prefill: the prompt's KV is computed and saved to kvtier; its one token is dropped.
        url = prefills.pick()
        t0 = time.perf_counter()
        try:
            async with session.post(url + request.path, json=prefill_body(body), headers=headers) as r:
                answer = await r.read()
                if r.status != 200:  # the request itself is wrong (or the server failed): say so
                    return web.Response(body=answer, status=r.status, content_type=r.content_type)
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            return bad_gateway("prefill", url, e)
        # 2. Decode: the original request; the answer goes back as it comes (streamed or not).
        # The prefill's time goes back in a header: a client can tell the two legs of its TTFT apart.
        timing = {PREFILL_HEADER: f"{time.perf_counter() - t0:.6f}"}
        url = decodes.pick()
        try:
            r = await session.post(url + request.path, json=body, headers=headers)
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            return bad_gateway("decode", url, e)
        async with r:
            if not body.get("stream"):
                return web.Response(body=await r.read(), status=r.status, content_type=r.content_type,
                                    headers=timing)
            out = web.StreamResponse(status=r.status, headers={"Content-Type": r.headers.get(
                "Content-Type", "text/event-stream"), "Cache-Control": "no-cache", **timing})
            await out.prepare(request)
            try:
                async for part in r.content.iter_any():
                    await out.write(part)
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:  # headers are sent: end the stream
                stats["decode_errors"] += 1
                log.warning("kvtier proxy: decode instance %s failed mid-stream (%s)", url, e)
            except ConnectionResetError:  # the client went away; closing r aborts the decode request
                return out
            await out.write_eof()
            return out

    async def models(request: web.Request) -> web.Response:
        url = decodes.urls[0]
        try:
            async with request.app["session"].get(url + "/v1/models") as r:
                return web.Response(body=await r.read(), status=r.status, content_type=r.content_type)
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            return bad_gateway("decode", url, e)

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"prefill": prefills.urls, "decode": decodes.urls, **stats})

    app = web.Application(client_max_size=64 << 20)  # long prompts
    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    for route in ROUTES:
        app.router.add_post(route, relay)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    return app


def serve(prefill: Sequence[str], decode: Sequence[str], host: str = "127.0.0.1", port: int = 8000,
          timeout_s: float = 600.0) -> None:
    """Run the proxy until interrupted."""
    from aiohttp import web

    app = make_app(prefill, decode, timeout_s)
    log.info("kvtier proxy on http://%s:%d: prefill %s, decode %s", host, port, ", ".join(prefill),
             ", ".join(decode))
    web.run_app(app, host=host, port=port, print=None)
