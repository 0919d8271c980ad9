"""Redis commands and replies moved between the socket and kvtier's buffers without a copy.

redis-py (with hiredis) reads a bulk reply into its own buffer, makes a ``bytes`` of it, and the
tier then copied that into the host slot: two copies of 32 MiB per chunk beside the socket's, and
on 2 cores four clients read 1 GB/s together. :class:`ReplyReader` parses the RESP2 framing itself
and receives each value's bytes with ``recv_into`` into the slot (3.1 GB/s for one client here,
1.7-1.9 for 2-8; ``benchmarks/bench_remote.py``).

Writes the same way: redis-py (with hiredis) packs a pipeline into one ``bytes``, copying every
value, with the GIL held (25 ms per 32 MiB chunk; puts ran at 0.6-0.8 GB/s where redis-benchmark
SETs 4 MiB values at 3.4 GB/s). :func:`encode_command` frames a command around the caller's
buffers and :func:`send_parts` hands them to the kernel with ``sendmsg`` (scatter-gather).

Only the replies to commands the caller sent on a connection it holds alone are read here: bulk
strings, nil (RESP2's ``$-1``, RESP3's ``_``), status lines (``+OK``) and errors (``-ERR ...``,
``-MOVED ...``). Anything else, or a reply cut short, is :class:`ReplyError`: the connection is
then in an unknown state and must be dropped.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence

Arg = bytes | memoryview | Sequence[bytes | memoryview]  # a value in parts is sent as one bulk string
_IOV_MAX = 1024  # buffers one sendmsg takes (Linux's UIO_MAXIOV)
_INLINE = 16 << 10  # parts smaller than this are copied together into one buffer before sending


def encode_command(args: Sequence[Arg]) -> list[bytes | memoryview]:
    """The RESP framing of one command around its arguments (bytes or 1-D byte memoryviews),
    which are not copied here."""
    out: list[bytes | memoryview] = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, (bytes, memoryview)):
            out += (b"$%d\r\n" % len(arg), arg, b"\r\n")
        else:
            out.append(b"$%d\r\n" % sum(len(p) for p in arg))
            out += arg
            out.append(b"\r\n")
    return out


def send_parts(sock: socket.socket, parts: Sequence[bytes | memoryview]) -> None:
    """All of ``parts``, in order: small ones joined (one copy of a few KiB), large ones handed to
    the kernel as they are, with as few ``sendmsg`` calls as it allows."""
    views: list[memoryview] = []
    small: list[bytes | memoryview] = []
    for p in parts:
        if len(p) < _INLINE:
            small.append(p)
            continue
        if small:
            views.append(memoryview(b"".join(small)))
            small = []
        views.append(memoryview(p).cast("B"))
    if small:
        views.append(memoryview(b"".join(small)))
    i = 0
    while i < len(views):
        sent = sock.sendmsg(views[i:i + _IOV_MAX])
        while i < len(views) and sent >= len(views[i]):
            sent -= len(views[i])
            i += 1
        if sent:
            views[i] = views[i][sent:]


class ReplyError(Exception):
    """The server's bytes are not the replies expected, or stopped: drop the connection."""


class ReplyReader:
    """RESP2 replies from ``sock``: a small buffer for the framing, values received in place."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = bytearray(4096)
        self._start = 0  # unread bytes are _buf[_start:_end]
        self._end = 0
        self.received = 0  # bytes received so far (0: the server has not answered at all)

    def _fill(self) -> None:
        if self._start == self._end:
            self._start = self._end = 0
        elif self._end == len(self._buf):  # a line longer than the buffer so far
            if len(self._buf) >= _LINE_MAX:
                raise ReplyError("reply line too long")
            self._buf.extend(bytes(len(self._buf)))
        n = self.sock.recv_into(memoryview(self._buf)[self._end:])
        if n == 0:
            raise ReplyError("connection closed by the server")
        self._end += n
        self.received += n

    def line(self) -> bytes:
        """The next line, without its CRLF."""
        while True:
            i = self._buf.find(b"\r\n", self._start, self._end)
            if i >= 0:
                out = bytes(self._buf[self._start:i])
                self._start = i + 2
                return out
            self._fill()

    def read_into(self, dest: memoryview) -> None:
        """Exactly ``len(dest)`` bytes into ``dest``: what is buffered first, then from the socket."""
        have = min(self._end - self._start, len(dest))
        dest[:have] = self._buf[self._start:self._start + have]
        self._start += have
        got = have
        while got < len(dest):
            n = self.sock.recv_into(dest[got:])
            if n == 0:
                raise ReplyError("connection closed by the server")
            got += n
            self.received += n

    def skip(self, n: int) -> None:
        """Read ``n`` bytes and drop them."""
        scratch = memoryview(bytearray(min(n, 1 << 20) or 1))
        while n > 0:
            step = min(n, len(scratch))
            self.read_into(scratch[:step])
            n -= step

    def bulk_header(self) -> int | str | None:
        """The next reply's kind: a bulk string's length (its bytes follow: :meth:`bulk_into` or
        :meth:`skip_bulk`), None for nil, or the text of an error reply."""
        line = self.line()
        kind, rest = line[:1], line[1:]
        if kind == b"$":
            try:
                n = int(rest)
            except ValueError:
                raise ReplyError(f"bad bulk length {rest[:40]!r}") from None
            return None if n < 0 else n
        if kind == b"_" and not rest:  # RESP3's null (redis-py 8 speaks RESP3 by default)
            return None
        if kind == b"-":
            return rest.decode("utf-8", "replace")
        raise ReplyError(f"unexpected reply {line[:40]!r}")

    def status(self) -> str | None:
        """The next reply, a status line (``+OK``): None; or the text of an error reply."""
        line = self.line()
        if line[:1] == b"+":
            return None
        if line[:1] == b"-":
            return line[1:].decode("utf-8", "replace")
        raise ReplyError(f"unexpected reply {line[:40]!r}")

    def integer(self) -> int | str:
        """The next reply, an integer (``:1``); or the text of an error reply."""
        line = self.line()
        if line[:1] == b":":
            try:
                return int(line[1:])
            except ValueError:
                raise ReplyError(f"bad integer {line[:40]!r}") from None
        if line[:1] == b"-":
            return line[1:].decode("utf-8", "replace")
        raise ReplyError(f"unexpected reply {line[:40]!r}")

    def bulk_into(self, dest: memoryview) -> None:
        """The bulk string's bytes (as many as ``dest`` holds, which must be its length) and its CRLF."""
        self.read_into(dest)
        self._crlf()

    def skip_bulk(self, n: int) -> None:
        self.skip(n)
        self._crlf()

    def _crlf(self) -> None:
        end = bytearray(2)
        self.read_into(memoryview(end))
        if end != b"\r\n":
            raise ReplyError("bulk string not followed by CRLF")
