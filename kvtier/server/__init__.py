"""Multi-process mode: one shared host-memory store served to many engine processes.

- :mod:`kvtier.server.protocol`: msgspec/msgpack messages (never pickle), with size limits.
- :mod:`kvtier.server.shm`: the POSIX shared-memory file holding the slots.
- :mod:`kvtier.server.server`: the `kvtier serve` process.
- :mod:`kvtier.server.client`: :class:`RemoteStore`, the store API over a server.
"""
