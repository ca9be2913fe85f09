"""The raw L2 backend interface: bytes in, bytes out, batch first.

Backends know nothing of KV, codecs or policies: they move opaque values for
opaque keys to and from an existing store (Redis/Valkey, Mooncake Store,
InfiniStore, local disk, memory). Everything else -- value header and
checksum, timeouts, health tracking and reconnects, ingestion queue -- lives
above them in :mod:`vllm_aibrix.core.l2.store`, so a new backend is one small
file.

Calls are synchronous and may block; the store runs them on its own thread
pool with a deadline. A backend raises :class:`BackendError` (or any
exception) for a failed operation; the store counts it and treats the keys as
misses. A backend must be safe to call from several threads at once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

Buffer = bytes | bytearray | memoryview


class BackendError(RuntimeError):
    """An L2 operation failed (unreachable server, protocol error, ...)."""


class BackendTimeout(BackendError):
    """An L2 operation gave up waiting for the store (a self-timed backend's deadline)."""


@dataclass(frozen=True)
class BackendCapabilities:
    """What the store needs to know about a backend to call it."""

    # Every call gives up by itself within the store's op timeout (socket
    # timeouts): the store may then call it on the caller's thread and skip
    # the thread-pool hop, which costs ~0.1-0.5 ms per call on a busy host.
    self_timed: bool = False


class L2BackendBase(ABC):
    """A remote (or node-local) key-value store for encoded KV blocks."""

    name: ClassVar[str] = "abstract"
    capabilities: ClassVar[BackendCapabilities] = BackendCapabilities()

    @abstractmethod
    def exists(self, keys: Sequence[bytes]) -> list[bool]:
        """Presence of each key, in one round trip where the store allows."""

    def exists_prefix(self, keys: Sequence[bytes]) -> int:
        """Number of leading keys present. Override when the store answers cheaper."""
        n = 0
        for present in self.exists(keys):
            if not present:
                break
            n += 1
        return n

    @abstractmethod
    def get_many(self, keys: Sequence[bytes]) -> list[Buffer | None]:
        """Values of ``keys`` (None for a missing key)."""

    def get_into(self, keys: Sequence[bytes], buffers: Sequence[memoryview]) -> list[int]:
        """Read values into caller buffers; returns bytes written per key, -1 = miss.

        A value larger than its buffer is a miss (never a partial copy).
        """
        out: list[int] = []
        for value, buf in zip(self.get_many(keys), buffers, strict=True):
            if value is None or len(value) > len(buf):
                out.append(-1)
                continue
            buf[: len(value)] = value
            out.append(len(value))
        return out

    @abstractmethod
    def put_many(self, items: Sequence[tuple[bytes, Buffer]]) -> None:
        """Write (overwrite) every ``(key, value)``; raise on failure."""

    def put_many_parts(self, items: Sequence[tuple[bytes, Sequence[Buffer]]]) -> None:
        """Like :meth:`put_many`, each value given as parts written back to back.

        The store hands values as (header, payload) so that a backend able to
        send a vector of buffers (Redis, disk) never copies the payload. The
        default joins the parts (one copy) and calls :meth:`put_many`.
        """
        self.put_many([(key, b"".join(parts)) for key, parts in items])

    @abstractmethod
    def delete(self, keys: Sequence[bytes]) -> None:
        """Remove keys; missing keys are not an error."""

    def ping(self) -> bool:
        """True when the store answers. Used for health checks and reconnects."""
        try:
            self.exists([b"\x00aibrix-ping"])
            return True
        except Exception:
            return False

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections. Further calls may fail."""
