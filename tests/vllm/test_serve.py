"""`vllm serve` (vLLM's OpenAI-compatible HTTP server) with kvtier, run from the README's commands (issue 13.3).

The commands of the README's "With `vllm serve`" section run as written, with this test's own
port and directories. Over HTTP, with the `openai` client: a prompt computed once; after vLLM's
own prefix cache is reset the server reports its prefix as cached (kvtier's cpu tier); after a
restart again (the disk tier); kvtier's counters are on the server's own `/metrics`; outputs
equal those of the same server without kvtier.
"""

from __future__ import annotations

import os
import random
import re
import shlex
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from kvtier.local_redis import free_port

ROOT = Path(__file__).resolve().parents[2]
DOC_WORDS = 1024  # four chunks of 256 tokens


def readme_commands() -> list[str]:
    """The shell commands of the README's "With `vllm serve`" section (first bash block)."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## With `vllm serve`", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    commands, current = [], ""
    for line in block.splitlines():
        current += line + "\n"
        if not line.endswith("\\") and current.count("'") % 2 == 0:  # a quoted JSON may span lines
            commands.append(current.strip())
            current = ""
    return commands


class Server:
    """An API server started from ``command`` in its own process group, stopped on exit."""

    def __init__(self, command: str, port: int, log: Path, model: str, wait: bool = True) -> None:
        """``wait=False``: return at once (start several side by side), then :meth:`wait_up`."""
        env = dict(os.environ, VLLM_SERVER_DEV_MODE="1", VLLM_ENABLE_V1_MULTIPROCESSING="1")
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self.model = model
        self.proc = subprocess.Popen(["bash", "-c", command], cwd=ROOT, env=env, stdout=open(log, "w"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        if wait:
            self.wait_up()

    def wait_up(self) -> None:
        log = self.log
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"server exited:\n{log.read_text()[-3000:]}"
            try:
                if urllib.request.urlopen(self.url + "/health", timeout=2).status == 200:
                    return
            except OSError:
                time.sleep(1)
        self.stop()
        raise AssertionError(f"server not up in 600 s:\n{log.read_text()[-3000:]}")

    def complete(self, prompt: str) -> tuple[str, int]:
        """Greedy text of 8 tokens, and the prompt tokens the server reports as cached."""
        import openai

        client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", timeout=300)
        r = client.completions.create(model=self.model, prompt=prompt, max_tokens=8, temperature=0)
        details = r.usage.prompt_tokens_details
        return r.choices[0].text, (details.cached_tokens or 0) if details else 0

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples of ``name`` on the server's Prometheus ``/metrics`` with ``labels``."""
        from prometheus_client.parser import text_string_to_metric_families

        text = urllib.request.urlopen(self.url + "/metrics", timeout=30).read().decode()
        return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    def reset_prefix_cache(self) -> None:
        urllib.request.urlopen(urllib.request.Request(self.url + "/reset_prefix_cache", method="POST"), timeout=30)

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGINT)  # the API server's own shutdown (kvtier flushes its disk writes)
            self.proc.wait(120)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.mark.engine
def test_vllm_serve_over_http_as_the_readme_says(tmp_path):
    make, serve = readme_commands()
    port = free_port()
    here = lambda cmd: cmd.replace("/tmp/kvtier-serve-", f"{tmp_path}/").replace("--port 8000",  # noqa: E731
                                                                                    f"--port {port} --host 127.0.0.1")
    subprocess.run(["bash", "-c", here(make)], cwd=ROOT, check=True, timeout=300)
    model = re.search(r"--model (\S+)", here(serve)).group(1)
    rnd = random.Random(3)
    doc = " ".join(f"w{rnd.randrange(3, 1024)}" for _ in range(DOC_WORDS))
    prompts = [f"{doc} w{5 + i} w{9 + i}" for i in range(3)]
    with Server(here(serve), port, tmp_path / "kvtier-1.log", model) as s:
        out = [s.complete(prompts[0])]
        s.reset_prefix_cache()  # vLLM's own copy is gone; kvtier's cpu tier still holds it
        out.append(s.complete(prompts[1]))
        # kvtier's counters in vLLM's own /metrics (issue 13.4)
        assert s.metric("vllm:kvtier_loaded_tokens_total") >= DOC_WORDS
        assert s.metric("vllm:kvtier_tier_hits_total", tier="cpu") >= DOC_WORDS // 256
        assert s.metric("vllm:kvtier_saved_chunks_total") >= DOC_WORDS // 256
        assert s.metric("vllm:kvtier_hit_tokens_total") >= DOC_WORDS
        assert s.metric("vllm:kvtier_lookups_total") >= 2
        assert s.metric("vllm:kvtier_load_errors_total") == 0
        # kvtier's host time on the engine thread, per step and side (issue 28.1), and the measured
        # compute of its cost model (issue 25)
        assert s.metric("vllm:kvtier_step_host_seconds_count", side="scheduler") >= 2
        assert s.metric("vllm:kvtier_step_host_seconds_count", side="worker") >= 2
        assert s.metric("vllm:kvtier_step_tokens_total") >= DOC_WORDS
    with Server(here(serve), port, tmp_path / "kvtier-2.log", model) as s:  # a new process: only the disk tier
        out.append(s.complete(prompts[2]))
        assert s.metric("vllm:kvtier_tier_hits_total", tier="disk") >= DOC_WORDS // 256
        assert s.metric("vllm:kvtier_op_seconds_count", tier="disk", op="get_into") >= 1
    assert out[0][1] == 0, "the first request found a prefix nobody computed"
    assert out[1][1] >= DOC_WORDS, f"after vLLM's cache reset: {out[1][1]} cached tokens, not kvtier's cpu tier"
    assert out[2][1] >= DOC_WORDS, f"after a restart: {out[2][1]} cached tokens, not kvtier's disk tier"
    alone = shlex.split(here(serve).replace("\\\n", " "))
    i = alone.index("--kv-transfer-config")
    del alone[i:i + 2]
    with Server(shlex.join(alone), port, tmp_path / "alone.log", model) as s:
        reference = [s.complete(p)[0] for p in prompts]
    assert [text for text, _ in out] == reference
