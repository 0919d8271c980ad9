"""Child server processes for tests, benchmarks and demos (redis-server, Mooncake's master and
segment holders): started in their own temp directory, crashed (SIGKILL), frozen (SIGSTOP),
restarted on the same ports, stopped. An ``atexit`` hook kills whatever is left as a backstop.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Sequence

HOST = "127.0.0.1"
_live: set[subprocess.Popen] = set()


def free_port(cluster_bus: bool = False) -> int:
    """A free TCP port on 127.0.0.1 (and port + 10000 free too, for a Redis cluster node's bus)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        if not cluster_bus:
            return port
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind((HOST, port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair on 127.0.0.1")


def port_open(host: str, port: int, timeout_s: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


class LocalProcess:
    """One child server with a work directory and a log file; a subclass starts it and says when
    it is ready. ``host``: the address it listens on; ``wrap``: a command prefix it runs under
    (``ip netns exec NAME``: a server on another "host", :mod:`kvtier.local_netns`)."""

    what = "process"
    log_name = ""  # default: "<what>.log"

    def __init__(self, host: str, workdir: str | None, wrap: Sequence[str] = (), dir_prefix: str = "") -> None:
        self.host = host
        self.wrap = list(wrap)
        self._own_dir = workdir is None
        self.workdir = workdir or tempfile.mkdtemp(prefix=dir_prefix or f"kvtier-{self.what}-")
        os.makedirs(self.workdir, exist_ok=True)
        self.log_path = os.path.join(self.workdir, self.log_name or f"{self.what}.log")
        self.proc: subprocess.Popen | None = None

    def _spawn(self, args: Sequence[str], log: bool = True, env: dict[str, str] | None = None) -> None:
        """Start ``wrap + args`` in the work directory, its output appended to the log file (or
        dropped: a server that writes its own log)."""
        with open(self.log_path if log else os.devnull, "ab") as out:
            self.proc = subprocess.Popen([*self.wrap, *args], stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                         cwd=self.workdir, start_new_session=True, env=env)
        _live.add(self.proc)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """Stop at once (SIGKILL: a crash, nothing flushed)."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGCONT)  # a frozen process dies as well
                self.proc.kill()
            self.proc.wait(10)
            _live.discard(self.proc)
            self.proc = None

    def pause(self) -> None:
        """Freeze (SIGSTOP): connections stay open, nothing answers."""
        if self.alive():
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGCONT)

    def start(self, timeout_s: float = 10.0) -> None:
        raise NotImplementedError

    def restart(self) -> None:
        """Kill (if running) and start again on the same ports and directory."""
        self.kill()
        self.start()

    def log_tail(self, n: int = 2000) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-n:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        self.kill()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@atexit.register
def _kill_leftovers() -> None:
    for p in list(_live):
        try:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
                p.wait(5)
        except OSError:
            pass
    _live.clear()
