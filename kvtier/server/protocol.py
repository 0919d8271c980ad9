"""Messages between `kvtier serve` and its clients: msgspec Structs encoded as msgpack.

Never pickle: a message is plain data, decoded against a fixed schema with bounds on
every list and number, so a hostile or broken peer gets a :class:`Error` reply and
cannot make the server run code or allocate without limit.

Only control data travels here (keys, slot ids, counts). Chunk bytes live in the
server's shared-memory file; a client reads and writes slots in its own mapping.

Every request carries ``rid`` (echoed in the reply, so a client drops late replies
of a request it gave up on) and, except ``Hello``, the ``client`` id that ``Hello``
returned. ``Release`` and ``Unlease`` are one-way: the server sends no reply.
"""

from __future__ import annotations

from typing import Annotated, Union

import msgspec
from msgspec import Meta, Struct

from kvtier.layout import LayoutMsg, layout_from_msg, layout_to_msg  # noqa: F401 (part of the protocol)

PROTOCOL_VERSION = 1

MAX_MESSAGE_BYTES = 1 << 20
"""Requests larger than this get an ``Error(too_large)`` reply without being decoded."""
HARD_MESSAGE_BYTES = 8 << 20
"""ZeroMQ drops the connection of a peer that sends more than this (ZMQ_MAXMSGSIZE)."""
MAX_KEYS = 8192
"""Keys (or slots) in one request: 8192 chunks of 256 tokens is a 2M-token prefix."""
MAX_KEY_BYTES = 64

Key = Annotated[bytes, Meta(min_length=1, max_length=MAX_KEY_BYTES)]
Keys = Annotated[list[Key], Meta(max_length=MAX_KEYS)]
SlotId = Annotated[int, Meta(ge=0, lt=1 << 40)]
SlotIds = Annotated[list[SlotId], Meta(max_length=MAX_KEYS)]
U64 = Annotated[int, Meta(ge=0, le=(1 << 63) - 1)]
ShortStr = Annotated[str, Meta(max_length=512)]


class _Req(Struct, tag_field="op", forbid_unknown_fields=True):
    rid: U64 = 0


class Hello(_Req, tag="hello"):
    """Open a session. ``label`` names the model namespace (informational unless the server pins one)."""

    version: int = PROTOCOL_VERSION
    label: ShortStr = ""
    layout: LayoutMsg | None = None
    token: ShortStr = ""
    pid: Annotated[int, Meta(ge=0, lt=1 << 32)] = 0


class Lookup(_Req, tag="lookup"):
    client: U64 = 0
    keys: Keys = []


class Contains(_Req, tag="contains"):
    client: U64 = 0
    keys: Keys = []


class Get(_Req, tag="get"):
    """Slots holding ``keys``; each is referenced for this client until it sends ``Release``."""

    client: U64 = 0
    keys: Keys = []


class Release(_Req, tag="release"):
    """One-way: drop one reference per listed slot (from ``Get`` or an uncommitted ``Allocate``)."""

    client: U64 = 0
    slots: SlotIds = []


class Allocate(_Req, tag="allocate"):
    client: U64 = 0
    n: Annotated[int, Meta(ge=1, le=MAX_KEYS)] = 1


class Commit(_Req, tag="commit"):
    """Publish allocated slots the client filled; the client's references pass to the store.

    ``noreply``: the client does not wait (the save path); the server still applies it in order.
    """

    client: U64 = 0
    keys: Keys = []
    slots: SlotIds = []
    noreply: bool = False


class Lease(_Req, tag="lease"):
    client: U64 = 0
    keys: Keys = []


class Unlease(_Req, tag="unlease"):
    """One-way: end leases by id."""

    client: U64 = 0
    ids: Annotated[list[U64], Meta(max_length=MAX_KEYS)] = []


class Ping(_Req, tag="ping"):
    """Heartbeat; also answers `kvtier health` (``client`` 0 needs no session)."""

    client: U64 = 0


class Stats(_Req, tag="stats"):
    client: U64 = 0


class Flush(_Req, tag="flush"):
    client: U64 = 0
    timeout_s: Annotated[float, Meta(ge=0, le=3600)] = 30.0


class Bye(_Req, tag="bye"):
    """Close the session now, releasing everything it holds."""

    client: U64 = 0


Request = Union[Hello, Lookup, Contains, Get, Release, Allocate, Commit, Lease, Unlease, Ping, Stats, Flush, Bye]
ONE_WAY = (Release, Unlease)


# ------------------------------------------------------------------ replies
class _Rep(Struct, tag_field="op"):
    rid: int = 0


class Welcome(_Rep, tag="welcome"):
    """Session opened: map ``shm_path`` and address slot ``i`` at ``data_offset + i * slot_bytes``."""

    client: int = 0
    server_id: str = ""
    shm_path: str = ""
    shm_bytes: int = 0
    data_offset: int = 0
    gen_offset: int = 0
    slot_bytes: int = 0
    num_slots: int = 0
    layout: LayoutMsg | None = None
    label: str = ""
    heartbeat_s: float = 0.0
    max_refs: int = 0


class Count(_Rep, tag="count"):
    n: int = 0


class Bools(_Rep, tag="bools"):
    values: list[bool] = []


class Slots(_Rep, tag="slots"):
    """``slots[i]`` is -1 for a miss; ``gens[i]`` is the slot's generation when handed out."""

    slots: list[int] = []
    gens: list[int] = []


class Ids(_Rep, tag="ids"):
    ids: list[int] = []


class Ok(_Rep, tag="ok"):
    pass


class StatsReply(_Rep, tag="stats"):
    values: dict[str, float] = {}


class Error(_Rep, tag="error"):
    """``code``: bad_message, too_large, version, auth, layout, label, unknown_client, bad_slot, internal."""

    code: str = ""
    message: str = ""


Reply = Union[Welcome, Count, Bools, Slots, Ids, Ok, StatsReply, Error]

_encoder = msgspec.msgpack.Encoder()
_req_decoder = msgspec.msgpack.Decoder(Request)
_rep_decoder = msgspec.msgpack.Decoder(Reply)


def encode(msg: Struct) -> bytes:
    return _encoder.encode(msg)


def decode_request(data: bytes) -> Request:
    """Raises :class:`msgspec.DecodeError` / :class:`msgspec.ValidationError` on bad input."""
    return _req_decoder.decode(data)


def decode_reply(data: bytes) -> Reply:
    return _rep_decoder.decode(data)
