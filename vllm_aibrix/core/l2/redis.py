"""Redis / Valkey L2 backend (standalone or cluster) on redis-py.

Speed notes (measured here, see docs/l2.md and docs/benchmarks.md):

* With ``hiredis`` installed redis-py also *packs* commands with hiredis,
  which copies every value into one buffer and caps SET at ~0.3 GB/s. We keep
  hiredis for parsing replies but pack commands ourselves
  (:class:`_VectorPacker`): large values, and the (header, payload) parts of
  an encoded value, are handed to ``sendall`` as separate buffers, so a 2 MiB
  payload is never copied on its way to the socket.
* Batches are non-transactional pipelines of single-key GET/SET/EXISTS. MGET
  of large values was measured slower than pipelined GETs, and in cluster
  mode the cluster pipeline splits single-key commands by slot/node for us
  (keys of one request hash to different slots on purpose: they spread load).

URL forms: ``redis://[:password@]host:port/db``, ``rediss://...`` for TLS
(query options ``ssl_ca_certs=PATH``, ``ssl_cert_reqs=none|optional|required``,
``ssl_check_hostname=false`` are honoured). ``config.redis_password`` wins over
a password in the URL. In cluster mode the URL names one seed node.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import redis as _redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.connection import Connection, ConnectionPool, Encoder, SSLConnection, parse_url
from redis.retry import Retry

from vllm_aibrix.core.config import CacheConfig
from vllm_aibrix.core.l2.backend import (
    BackendCapabilities,
    BackendError,
    BackendTimeout,
    Buffer,
    L2BackendBase,
)

_CRLF = b"\r\n"
# Below this many bytes an argument is joined into the command buffer; above
# it is sent as its own buffer (redis-py's own threshold).
_BUFFER_CUTOFF = 6000


class ValueParts:
    """A bulk-string argument given as several buffers (header + payload)."""

    __slots__ = ("nbytes", "parts")

    def __init__(self, parts: Sequence[Buffer]) -> None:
        self.parts = [memoryview(p).cast("B") if not isinstance(p, bytes) else p for p in parts]
        self.nbytes = sum(len(p) for p in self.parts)


class _VectorPacker:
    """RESP command packer that never copies large arguments.

    Drop-in for redis-py's ``command_packer`` (same ``pack(*args)`` contract:
    returns a list of bytes-like chunks that the connection sends in order).
    """

    def __init__(self) -> None:
        self.encode = Encoder("utf-8", "strict", False).encode

    def pack(self, *args: Any) -> list[Any]:
        # Multi-word command names ("CLUSTER SLOTS") must go as separate args.
        if isinstance(args[0], str):
            args = tuple(args[0].encode().split()) + args[1:]
        elif b" " in args[0]:
            args = tuple(args[0].split()) + args[1:]
        out: list[Any] = []
        buff = b"*%d\r\n" % len(args)
        for arg in args:
            if isinstance(arg, ValueParts):
                out.append(buff + b"$%d\r\n" % arg.nbytes)
                out.extend(arg.parts)
                buff = _CRLF
                continue
            enc = self.encode(arg)
            n = len(enc)
            if n > _BUFFER_CUTOFF or isinstance(enc, memoryview):
                out.append(buff + b"$%d\r\n" % n)
                out.append(enc)
                buff = _CRLF
            else:
                buff = b"".join((buff, b"$%d\r\n" % n, enc, _CRLF))
        out.append(buff)
        return out


class _FastConnection(Connection):
    """TCP connection with the vectored packer (and hiredis reply parsing)."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("command_packer", _VectorPacker())
        super().__init__(**kwargs)


class _FastSSLConnection(SSLConnection):
    """TLS connection with the vectored packer."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("command_packer", _VectorPacker())
        super().__init__(**kwargs)


def connection_kwargs(
    url: str, password: str = "", timeout_s: float = 1.0
) -> tuple[dict[str, Any], bool]:
    """redis-py keyword arguments for ``url``; second item: TLS or not."""
    kw = parse_url(url)
    tls = url.startswith("rediss://")
    kw["connection_class"] = _FastSSLConnection if tls else _FastConnection
    if password:
        kw["password"] = password
    kw.setdefault("socket_timeout", timeout_s)
    kw.setdefault("socket_connect_timeout", timeout_s)
    if tls:
        reqs = kw.get("ssl_cert_reqs")
        if isinstance(reqs, str):
            kw["ssl_cert_reqs"] = reqs.lower()
    return kw, tls


class RedisBackend(L2BackendBase):
    """Redis / Valkey, standalone (``redis_cluster=False``) or Redis Cluster."""

    name = "redis"
    # Socket connect/read timeouts equal the store's op timeout: self-timed.
    capabilities = BackendCapabilities(self_timed=True)

    def __init__(
        self,
        config: CacheConfig,
        *,
        url: str | None = None,
        cluster: bool | None = None,
        max_connections: int = 64,
    ) -> None:
        self.url = url or config.redis_url
        self.cluster = config.redis_cluster if cluster is None else cluster
        kw, self.tls = connection_kwargs(self.url, config.redis_password, config.l2_op_timeout_s)
        kw["max_connections"] = max_connections
        self._client: Any
        try:
            if self.cluster:
                kw.pop("db", None)  # clusters have only db 0
                host, port = kw.pop("host", "127.0.0.1"), kw.pop("port", 6379)
                # Only with ``url=`` does RedisCluster build node pools from our
                # kwargs (and so honour connection_class); give it a bare URL so
                # that nothing in it overrides them (password, TLS class).
                self._client = RedisCluster(
                    url=f"redis://{host}:{port}",
                    retry=Retry(NoBackoff(), 1),
                    require_full_coverage=True,
                    **kw,
                )
            else:
                pool = ConnectionPool(retry=Retry(NoBackoff(), 0), **kw)
                self._client = _redis.Redis(connection_pool=pool)
        except _redis.RedisError as e:  # cluster start-up contacts the seed node
            raise BackendError(f"cannot connect to {self._safe_url()}: {e}") from e

    def _safe_url(self) -> str:
        kw = parse_url(self.url)
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{kw.get('host', '?')}:{kw.get('port', '?')}"

    def _pipeline(self) -> Any:
        return self._client.pipeline(transaction=False)

    def _run(self, pipe: Any) -> list[Any]:
        try:
            return list(pipe.execute())
        except _redis.TimeoutError as e:
            raise BackendTimeout(f"redis {self._safe_url()}: {e}") from e
        except _redis.RedisError as e:
            raise BackendError(f"redis {self._safe_url()}: {e}") from e

    # -- API ---------------------------------------------------------------------
    def exists(self, keys: Sequence[bytes]) -> list[bool]:
        if not keys:
            return []
        pipe = self._pipeline()
        for k in keys:
            pipe.exists(k)
        return [bool(r) for r in self._run(pipe)]

    def get_many(self, keys: Sequence[bytes]) -> list[Buffer | None]:
        if not keys:
            return []
        if len(keys) == 1 and not self.cluster:
            try:
                return [self._client.get(keys[0])]
            except _redis.TimeoutError as e:
                raise BackendTimeout(f"redis {self._safe_url()}: {e}") from e
            except _redis.RedisError as e:
                raise BackendError(f"redis {self._safe_url()}: {e}") from e
        pipe = self._pipeline()
        for k in keys:
            pipe.get(k)
        return self._run(pipe)

    def put_many(self, items: Sequence[tuple[bytes, Buffer]]) -> None:
        self.put_many_parts([(k, (v,)) for k, v in items])

    def put_many_parts(self, items: Sequence[tuple[bytes, Sequence[Buffer]]]) -> None:
        if not items:
            return
        pipe = self._pipeline()
        for k, parts in items:
            pipe.set(k, ValueParts(parts))
        self._run(pipe)

    def delete(self, keys: Sequence[bytes]) -> None:
        if not keys:
            return
        pipe = self._pipeline()
        for k in keys:
            pipe.delete(k)
        self._run(pipe)

    def ping(self) -> bool:
        try:
            return bool(self._client.ping())
        except Exception:
            return False

    def flushall(self) -> None:
        """Remove every key of the server(s) (tests and benchmarks only)."""
        if self.cluster:
            self._client.flushall(target_nodes=RedisCluster.PRIMARIES)
        else:
            self._client.flushall()

    @property
    def client(self) -> Any:
        """The underlying redis-py client (for diagnostics and benchmarks)."""
        return self._client

    def close(self) -> None:
        with contextlib.suppress(Exception):  # closing a dead connection must not raise
            self._client.close()
