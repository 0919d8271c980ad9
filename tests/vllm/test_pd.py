"""Prefill/decode disaggregation on CPU, over HTTP (issue 27.1): one `kvtier serve`, two `vllm serve`
(kv_role kv_producer and kv_consumer, both clients of the server), `kvtier proxy` in front.

Every prompt goes through the proxy: the prefill instance computes it (one token) and saves its
chunks to the server; the decode instance loads them and computes only the prompt's last block.
Checked: the decode instance reports every prompt's tokens but the last block as cached and its
kvtier counters show them loaded, it saved nothing, the prefill instance loaded nothing; outputs
(streamed and not) equal those of vLLM alone, token for token (greedy; the word tokenizer maps
each word to one token).
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from kvtier.local_redis import free_port
from test_serve import Server

ROOT = Path(__file__).resolve().parents[2]
BLOCK = 32  # the engines' block size, and kvtier's chunk size: a hit ends at the prompt's last full block
MAX_TOKENS = 8

pytestmark = pytest.mark.engine


def _serve_cmd(model: str, port: int, kv: dict | None) -> str:
    cmd = (f"{sys.executable} -m vllm.entrypoints.openai.api_server --model {model} --host 127.0.0.1 "
           f"--port {port} --dtype float32 --enforce-eager --max-model-len 2048 --block-size {BLOCK} "
           f"--max-num-batched-tokens 512 --enable-prompt-tokens-details --no-enable-log-requests")
    if kv is not None:
        cmd += f" --kv-transfer-config '{json.dumps(kv)}'"
    return cmd


def _kv(role: str, address: str) -> dict:
    return {"kv_connector": "KVTierConnector", "kv_role": role,
            "kv_connector_extra_config": {"chunk_size": BLOCK, "server": address, "tiers": ["cpu"]}}


def _post(url: str, body: dict) -> dict | str:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        raw = r.read().decode()
    if body.get("stream"):  # the text of the SSE events, in order
        events = [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: {")]
        return "".join(e["choices"][0]["text"] for e in events)
    return json.loads(raw)


@pytest.fixture(scope="module")
def pd(tmp_path_factory):
    """(proxy URL, prefill Server, decode Server, alone Server, model)."""
    from kvtier.models import SIZES, make_random_llama, write_word_tokenizer
    from kvtier.server.server import ping

    tmp = tmp_path_factory.mktemp("pd")
    model = make_random_llama(tmp / "tiny", "tiny")
    write_word_tokenizer(model, SIZES["tiny"]["vocab_size"])
    sock_dir = tempfile.mkdtemp(prefix="kvpd-", dir="/tmp")
    address = f"ipc://{sock_dir}/s.sock"
    kvserve = subprocess.Popen([sys.executable, "-m", "kvtier.cli", "serve", "--address", address, "--tiers", "cpu",
                                "--cpu-bytes", "128MiB", "--log-level", "WARNING"],
                               stdout=open(tmp / "kvserve.log", "w"), stderr=subprocess.STDOUT)
    started: list = []
    proxy = None
    try:
        deadline = time.monotonic() + 60
        while not ping(address, 0.2):
            assert kvserve.poll() is None and time.monotonic() < deadline, "kvtier serve did not start"
        ports = [free_port() for _ in range(4)]
        # Started side by side (Server waits for each; the others boot meanwhile).
        procs = {name: Server(_serve_cmd(model, port, kv), port, tmp / f"{name}.log", model, wait=False)
                 for name, port, kv in (("prefill", ports[0], _kv("kv_producer", address)),
                                        ("decode", ports[1], _kv("kv_consumer", address)), ("alone", ports[2], None))}
        started += procs.values()
        for s in started:
            s.wait_up()
        proxy = subprocess.Popen([sys.executable, "-m", "kvtier.cli", "proxy", "--prefill", procs["prefill"].url,
                                  "--decode", procs["decode"].url, "--port", str(ports[3]), "--log-level", "WARNING"],
                                 stdout=open(tmp / "proxy.log", "w"), stderr=subprocess.STDOUT)
        front = f"http://127.0.0.1:{ports[3]}"
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(front + "/health", timeout=2)
                break
            except OSError:
                assert proxy.poll() is None and time.monotonic() < deadline, (tmp / "proxy.log").read_text()
                time.sleep(0.3)
        yield front, procs["prefill"], procs["decode"], procs["alone"], model
    finally:
        if proxy is not None:
            proxy.terminate()
            proxy.wait(30)
        for s in started:
            s.stop()
        kvserve.send_signal(signal.SIGTERM)
        kvserve.wait(60)
        shutil.rmtree(sock_dir, ignore_errors=True)


def test_prefill_then_decode_through_the_proxy(pd):
    front, prefill, decode, alone, model = pd
    rnd = random.Random(27)
    prompts = [" ".join(f"w{rnd.randrange(3, 1024)}" for _ in range(n)) for n in (200, 333, 64, 700, 481)]
    got, cached, lengths = [], [], []
    for p in prompts:
        r = _post(front + "/v1/completions", {"model": model, "prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0})
        got.append(r["choices"][0]["text"])
        lengths.append(r["usage"]["prompt_tokens"])
        cached.append((r["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    # Streamed through the proxy: the decode instance's events, relayed as they come.
    streamed = _post(front + "/v1/completions", {"model": model, "prompt": prompts[1], "max_tokens": MAX_TOKENS,
                                                 "temperature": 0, "stream": True})
    want = [(n - 1) // BLOCK * BLOCK for n in lengths]  # all but the last block (with at least one token)
    facts = {n: decode.metric(f"vllm:kvtier_{n}_total")
             for n in ("lookups", "hit_tokens", "loaded_tokens", "load_errors")}
    assert cached == want, (f"decode instance's cached tokens {cached}, expected {want} (prompt lengths {lengths}); "
                            f"its kvtier counters {facts}")
    # They came from kvtier (the decode instance never saw these prompts before): loaded, not computed.
    assert decode.metric("vllm:kvtier_loaded_tokens_total") >= sum(want)
    assert decode.metric("vllm:kvtier_saved_chunks_total") == 0, "the decode instance saved chunks"
    assert decode.metric("vllm:kvtier_load_errors_total") == 0
    assert prefill.metric("vllm:kvtier_loaded_tokens_total") == 0, "the prefill instance loaded chunks"
    assert prefill.metric("vllm:kvtier_saved_chunks_total") >= sum(n // BLOCK for n in lengths)
    reference = [_post(alone.url + "/v1/completions", {"model": model, "prompt": p, "max_tokens": MAX_TOKENS,
                                                       "temperature": 0})["choices"][0]["text"] for p in prompts]
    assert got == reference
    assert streamed == reference[1]
    assert all(len(t.split()) == MAX_TOKENS for t in got)
