"""`kvtier proxy` against fake OpenAI servers (no engine): what each upstream receives, streaming,
round robin, and a 502 naming an upstream that is down."""

from __future__ import annotations

import asyncio
import json

import pytest

aiohttp = pytest.importorskip("aiohttp")
from aiohttp import web  # noqa: E402

from kvtier.local_redis import free_port  # noqa: E402
from kvtier.proxy import make_app, prefill_body  # noqa: E402


def _fake(name: str, seen: list):
    """An OpenAI-like server that records (name, path, body) and answers with its name."""

    async def complete(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        seen.append((name, request.path, body, request.headers.get("Authorization")))
        if body.get("prompt") == "bad":
            return web.json_response({"error": {"message": "bad prompt"}}, status=400)
        if body.get("stream"):
            out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await out.prepare(request)
            for i in range(3):
                await out.write(f"data: {json.dumps({'from': name, 'i': i})}\n\n".encode())
                await asyncio.sleep(0.01)
            await out.write(b"data: [DONE]\n\n")
            await out.write_eof()
            return out
        return web.json_response({"from": name, "choices": [{"text": f"{name}-text"}]})

    app = web.Application()
    app.router.add_post("/v1/completions", complete)
    app.router.add_post("/v1/chat/completions", complete)
    return app


async def _serve(app, port: int) -> web.AppRunner:
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


def test_prefill_body_is_one_token_not_streamed():
    body = {"model": "m", "prompt": "x", "max_tokens": 50, "stream": True, "stream_options": {"include_usage": True},
            "n": 3, "min_tokens": 5, "temperature": 0}
    out = prefill_body(body)
    assert out == {"model": "m", "prompt": "x", "max_tokens": 1, "stream": False, "n": 1, "temperature": 0}
    assert body["max_tokens"] == 50  # the original is left for the decode instance
    assert prefill_body({"messages": [], "max_completion_tokens": 9})["max_completion_tokens"] == 1


def test_proxy_routes_prefill_then_decode():
    seen: list = []

    async def main() -> None:
        ports = [free_port() for _ in range(4)]
        pre, dec_a, dec_b, front = ports
        runners = [await _serve(_fake("prefill", seen), pre), await _serve(_fake("decodeA", seen), dec_a),
                   await _serve(_fake("decodeB", seen), dec_b),
                   await _serve(make_app([f"http://127.0.0.1:{pre}"],
                                         [f"http://127.0.0.1:{dec_a}", f"http://127.0.0.1:{dec_b}/"], 30), front)]
        try:
            async with aiohttp.ClientSession() as s:
                url = f"http://127.0.0.1:{front}"
                hdr = {"Authorization": "Bearer k"}
                answers = []
                for i in range(2):
                    async with s.post(url + "/v1/completions", json={"prompt": f"p{i}", "max_tokens": 7},
                                      headers=hdr) as r:
                        assert r.status == 200
                        assert float(r.headers["X-Kvtier-Prefill-Seconds"]) > 0
                        answers.append((await r.json())["from"])
                assert answers == ["decodeA", "decodeB"]  # round robin
                async with s.post(url + "/v1/chat/completions",
                                  json={"messages": [{"role": "user", "content": "hi"}], "stream": True}) as r:
                    assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
                    text = (await r.read()).decode()
                assert text.count("data: ") == 4 and text.rstrip().endswith("[DONE]")
                async with s.post(url + "/v1/completions", json={"prompt": "bad"}) as r:
                    assert r.status == 400 and "bad prompt" in (await r.text())  # the prefill's own answer
                async with s.get(url + "/health") as r:
                    assert (await r.json())["requests"] == 4
        finally:
            for runner in runners:
                await runner.cleanup()

    asyncio.run(main())
    kinds = [(name, path) for name, path, *_ in seen]
    assert kinds == [("prefill", "/v1/completions"), ("decodeA", "/v1/completions"),
                     ("prefill", "/v1/completions"), ("decodeB", "/v1/completions"),
                     ("prefill", "/v1/chat/completions"), ("decodeA", "/v1/chat/completions"),
                     ("prefill", "/v1/completions")]
    assert seen[0][2] == {"prompt": "p0", "max_tokens": 1, "stream": False, "n": 1}
    assert seen[1][2] == {"prompt": "p0", "max_tokens": 7}
    assert seen[0][3] == seen[1][3] == "Bearer k"
    assert seen[4][2]["stream"] is False and seen[5][2]["stream"] is True


@pytest.mark.parametrize("down", ["prefill", "decode"])
def test_an_upstream_down_is_a_502_naming_it(down):
    seen: list = []

    async def main() -> tuple[int, str]:
        up, gone, front = free_port(), free_port(), free_port()
        urls = {"prefill": [f"http://127.0.0.1:{gone if down == 'prefill' else up}"],
                "decode": [f"http://127.0.0.1:{gone if down == 'decode' else up}"]}
        runners = [await _serve(_fake("up", seen), up), await _serve(make_app(urls["prefill"], urls["decode"], 5), front)]
        try:
            async with aiohttp.ClientSession() as s:
                async with s.post(f"http://127.0.0.1:{front}/v1/completions", json={"prompt": "x"}) as r:
                    return r.status, await r.text()
        finally:
            for runner in runners:
                await runner.cleanup()

    status, text = asyncio.run(main())
    assert status == 502
    assert f"{down} instance http://127.0.0.1:" in text and "unreachable" in text
