"""The one configuration object of vllm_aibrix.

Built once at startup from a dict (vLLM's ``kv_connector_extra_config``) and
from ``AIBRIX_KV_CACHE_OL_*`` environment variables; explicit dict values win
over the environment. Every field is validated at construction and a bad value
raises :class:`ConfigError` naming the field and what it accepts. A field that
belongs to one L2 backend (``redis_*``, ``disk_*``, ``mooncake_*``,
``infinistore_*``, ``memory_store_name``) set to anything but its default while
``l2_cache_backend`` names another backend is an error too: the setting would
be silently ignored. An environment variable counts as setting it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any

ENV_PREFIX = "AIBRIX_KV_CACHE_OL_"


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type or out of range."""


class IngestionType(StrEnum):
    """Which policy event writes an L1 block to L2."""

    ALL = "ALL"  # every L1 insert
    HOT = "HOT"  # the policy says the key became hot
    EVICTED = "EVICTED"  # the block leaves L1 (exclusive tiers)


class L2Backend(StrEnum):
    """Remote/second-tier stores we know how to talk to."""

    NONE = "NONE"
    MEMORY = "MEMORY"
    REDIS = "REDIS"
    DISK = "DISK"
    MOONCAKE = "MOONCAKE"
    INFINISTORE = "INFINISTORE"


class Compression(StrEnum):
    """Per-value compression in L2."""

    NONE = "NONE"
    ZSTD = "ZSTD"


def _meta(
    env: str | None,
    doc: str,
    choices: tuple[str, ...] | None = None,
    *,
    backend: L2Backend | None = None,
) -> dict[str, Any]:
    """Field metadata; ``backend``: the only ``l2_cache_backend`` the field applies to."""
    return {
        "env": env,
        "doc": doc,
        "choices": choices,
        "backend": None if backend is None else backend.value,
    }


@dataclass(frozen=True)
class CacheConfig:
    """All settings of the tiered KV cache. See docs/configuration.md."""

    # --- L1 (embedded CPU memory) ---
    l1_cache_enabled: bool = field(
        default=True, metadata=_meta("L1_CACHE_ENABLED", "Enable the embedded CPU-memory tier.")
    )
    l1_cache_capacity_gb: float = field(
        default=1.0,
        metadata=_meta(
            "L1_CACHE_CAPACITY_GB", "L1 capacity per TP rank in GiB (shards of all layers)."
        ),
    )
    l1_cache_eviction_policy: str = field(
        default="S3FIFO",
        metadata=_meta(
            "L1_CACHE_EVICTION_POLICY",
            "Eviction policy: LRU, FIFO, S3FIFO, SIEVE, or a 'module:Class' import path.",
        ),
    )
    l1_prefix_aware_eviction: bool = field(
        default=True,
        metadata=_meta(
            "L1_PREFIX_AWARE_EVICTION",
            "When a block is evicted, also drop its cached descendants (unreachable by a "
            "prefix lookup) so the space goes to blocks that can still hit.",
        ),
    )
    s3fifo_small_queue_ratio: float = field(
        default=0.1,
        metadata=_meta("S3FIFO_SMALL_QUEUE_RATIO", "S3FIFO: share of capacity for the small FIFO."),
    )
    s3fifo_move_to_main_threshold: int = field(
        default=2,
        metadata=_meta(
            "S3FIFO_MOVE_TO_MAIN_THRESHOLD",
            "S3FIFO: a key leaving the small FIFO moves to main when its frequency "
            "is at least this (2 = more than one hit, as in the SOSP'23 paper).",
        ),
    )
    # --- keys ---
    block_size_tokens: int = field(
        default=0,
        metadata=_meta(
            "BLOCK_SIZE",
            "Tokens per cache block; 0 = the engine's block size. Must be a multiple of it.",
        ),
    )
    namespace: str = field(
        default="aibrix",
        metadata=_meta("NAMESPACE", "Free-form namespace mixed into every key."),
    )
    model_fingerprint: str = field(
        default="",
        metadata=_meta(
            "MODEL_FINGERPRINT",
            "Extra model identity (e.g. weights revision). The connector adds model name, "
            "dtype, layout, block size and TP rank itself.",
        ),
    )
    # --- L2 (remote/shared tier) ---
    l2_cache_backend: str = field(
        default="NONE",
        metadata=_meta(
            "L2_CACHE_BACKEND", "Second tier backend.", tuple(b.value for b in L2Backend)
        ),
    )
    l2_cache_ingestion_type: str = field(
        default="HOT",
        metadata=_meta(
            "L2_CACHE_INGESTION_TYPE",
            "Which L1 event writes a block to L2.",
            tuple(t.value for t in IngestionType),
        ),
    )
    l2_cache_op_timeout_ms: int = field(
        default=1000,
        metadata=_meta("L2_CACHE_OP_TIMEOUT_MS", "Timeout of one L2 operation (ms)."),
    )
    l2_lookup_async: bool = field(
        default=True,
        metadata=_meta(
            "L2_LOOKUP_ASYNC",
            "Ask L2 which blocks it holds in the background: the scheduler never waits "
            "on the network; a request whose answer is not in yet is asked about again "
            "next step.",
        ),
    )
    l2_lookup_max_wait_ms: int = field(
        default=200,
        metadata=_meta(
            "L2_LOOKUP_MAX_WAIT_MS",
            "How long a request waits for its background L2 lookup before it proceeds "
            "with what L1 holds (ms).",
        ),
    )
    l2_cache_ingestion_max_inflight_mb: float = field(
        default=256.0,
        metadata=_meta(
            "L2_CACHE_INGESTION_MAX_INFLIGHT_MB",
            "Bound on bytes waiting to be written to L2; beyond it the oldest pending "
            "write is dropped (and counted).",
        ),
    )
    l2_cache_ingestion_batch_size: int = field(
        default=16,
        metadata=_meta("L2_CACHE_INGESTION_BATCH_SIZE", "Blocks per batched L2 put."),
    )
    l2_cache_compression: str = field(
        default="NONE",
        metadata=_meta(
            "L2_CACHE_COMPRESSION",
            "Per-value compression in L2.",
            tuple(c.value for c in Compression),
        ),
    )
    l2_cache_retry_interval_s: float = field(
        default=5.0,
        metadata=_meta(
            "L2_CACHE_RETRY_INTERVAL_S", "Seconds between reconnect attempts to a down L2."
        ),
    )
    redis_url: str = field(
        default="redis://127.0.0.1:6379/0",
        metadata=_meta(
            "REDIS_URL",
            "Redis/Valkey URL (redis:// or rediss:// for TLS).",
            backend=L2Backend.REDIS,
        ),
    )
    redis_cluster: bool = field(
        default=False,
        metadata=_meta("REDIS_CLUSTER", "Talk to a Redis Cluster.", backend=L2Backend.REDIS),
    )
    redis_password: str = field(
        default="",
        metadata=_meta(
            "REDIS_PASSWORD", "Redis AUTH password (overrides URL).", backend=L2Backend.REDIS
        ),
    )
    memory_store_name: str = field(
        default="",
        metadata=_meta(
            "MEMORY_STORE_NAME",
            "Stores of the same non-empty name in one process share their contents "
            "(e.g. a scheduler and its workers); empty = a private store.",
            backend=L2Backend.MEMORY,
        ),
    )
    disk_path: str = field(
        default="",
        metadata=_meta("DISK_PATH", "Directory of the local disk tier.", backend=L2Backend.DISK),
    )
    disk_capacity_gb: float = field(
        default=10.0,
        metadata=_meta(
            "DISK_CAPACITY_GB", "Capacity of the local disk tier.", backend=L2Backend.DISK
        ),
    )
    mooncake_master: str = field(
        default="127.0.0.1:50051",
        metadata=_meta(
            "MOONCAKE_MASTER", "Mooncake master RPC address host:port.", backend=L2Backend.MOONCAKE
        ),
    )
    mooncake_metadata_server: str = field(
        default="http://127.0.0.1:8080/metadata",
        metadata=_meta(
            "MOONCAKE_METADATA_SERVER", "Mooncake metadata server URL.", backend=L2Backend.MOONCAKE
        ),
    )
    mooncake_local_hostname: str = field(
        default="127.0.0.1",
        metadata=_meta(
            "MOONCAKE_LOCAL_HOSTNAME", "Address this client advertises.", backend=L2Backend.MOONCAKE
        ),
    )
    mooncake_global_segment_size_mb: int = field(
        default=0,
        metadata=_meta(
            "MOONCAKE_GLOBAL_SEGMENT_SIZE_MB",
            "Memory this process contributes to the store (0 = pure client).",
            backend=L2Backend.MOONCAKE,
        ),
    )
    mooncake_local_buffer_size_mb: int = field(
        default=256,
        metadata=_meta(
            "MOONCAKE_LOCAL_BUFFER_SIZE_MB",
            "Mooncake client transfer buffer.",
            backend=L2Backend.MOONCAKE,
        ),
    )
    infinistore_host: str = field(
        default="127.0.0.1",
        metadata=_meta(
            "INFINISTORE_HOST", "InfiniStore server host.", backend=L2Backend.INFINISTORE
        ),
    )
    infinistore_port: int = field(
        default=12345,
        metadata=_meta(
            "INFINISTORE_PORT", "InfiniStore service port.", backend=L2Backend.INFINISTORE
        ),
    )
    infinistore_connection_type: str = field(
        default="TCP",
        metadata=_meta(
            "INFINISTORE_CONNECTION_TYPE",
            "TCP or RDMA.",
            ("TCP", "RDMA"),
            backend=L2Backend.INFINISTORE,
        ),
    )
    # --- connector behaviour ---
    load_async: bool = field(
        default=True,
        metadata=_meta(
            "LOAD_ASYNC",
            "Load hits through vLLM's WAITING_FOR_REMOTE_KVS path instead of in the step.",
        ),
    )
    store_async: bool = field(
        default=True,
        metadata=_meta(
            "STORE_ASYNC",
            "Copy computed blocks into L1 (and on to L2) in the background while the "
            "next step runs; a finished request's blocks are freed once they are read.",
        ),
    )
    min_hit_tokens: int = field(
        default=0,
        metadata=_meta(
            "MIN_HIT_TOKENS", "Ignore external hits shorter than this many tokens (0 = any)."
        ),
    )
    load_deadline_s: float = field(
        default=10.0,
        metadata=_meta(
            "LOAD_DEADLINE_S",
            "Per-rank deadline of one async load; a rank that misses it reports the "
            "load failed and vLLM recomputes those tokens (no rank waits for another).",
        ),
    )
    metrics_enabled: bool = field(
        default=True, metadata=_meta("METRICS_ENABLED", "Export Prometheus metrics.")
    )
    debug_fault_file: str = field(
        default="",
        metadata=_meta(
            "DEBUG_FAULT_FILE",
            "Testing only: a JSON file of load faults the workers inject "
            "(see vllm_aibrix/vllm/faults.py). Empty = no faults.",
        ),
    )

    def __post_init__(self) -> None:
        self._check_positive("l1_cache_capacity_gb", allow_zero=False)
        self._check_range("s3fifo_small_queue_ratio", 0.0, 1.0, inclusive=False)
        # S3FIFO's frequency is a 2-bit counter, so only 1..3 can ever be reached.
        self._check_range("s3fifo_move_to_main_threshold", 1, 3, inclusive=True)
        self._check_positive("block_size_tokens", allow_zero=True)
        self._check_positive("l2_cache_op_timeout_ms", allow_zero=False)
        self._check_positive("l2_lookup_max_wait_ms", allow_zero=True)
        self._check_positive("l2_cache_ingestion_max_inflight_mb", allow_zero=False)
        self._check_positive("l2_cache_ingestion_batch_size", allow_zero=False)
        self._check_positive("l2_cache_retry_interval_s", allow_zero=False)
        self._check_positive("disk_capacity_gb", allow_zero=False)
        self._check_positive("mooncake_global_segment_size_mb", allow_zero=True)
        self._check_positive("mooncake_local_buffer_size_mb", allow_zero=False)
        self._check_positive("min_hit_tokens", allow_zero=True)
        self._check_positive("load_deadline_s", allow_zero=False)
        self._check_range("infinistore_port", 1, 65535, inclusive=True)
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices:
                value = str(getattr(self, f.name)).upper()
                if value not in choices:
                    raise ConfigError(
                        f"{f.name}={getattr(self, f.name)!r} is not one of {', '.join(choices)}"
                    )
                object.__setattr__(self, f.name, value)
        # Imported here: the registry imports policies, which import nothing of config.
        from vllm_aibrix.core.policy.registry import resolve_policy

        try:
            resolve_policy(self.l1_cache_eviction_policy)
        except (KeyError, ImportError, AttributeError, TypeError) as e:
            raise ConfigError(f"l1_cache_eviction_policy: {e}") from None
        self._check_backend_specific_fields()
        if self.l2_backend == L2Backend.DISK and not self.disk_path:
            raise ConfigError("disk_path must be set when l2_cache_backend=DISK")
        if not self.l1_cache_enabled and self.l2_backend == L2Backend.NONE:
            raise ConfigError(
                "l1_cache_enabled=False needs an l2_cache_backend: with neither tier "
                "there is nothing to cache into"
            )

    # -- typed views ---------------------------------------------------------
    @property
    def l2_backend(self) -> L2Backend:
        return L2Backend(self.l2_cache_backend)

    @property
    def ingestion(self) -> IngestionType:
        return IngestionType(self.l2_cache_ingestion_type)

    @property
    def compression(self) -> Compression:
        return Compression(self.l2_cache_compression)

    @property
    def l1_capacity_bytes(self) -> int:
        return int(self.l1_cache_capacity_gb * (1 << 30))

    @property
    def l2_op_timeout_s(self) -> float:
        return self.l2_cache_op_timeout_ms / 1000.0

    # -- construction --------------------------------------------------------
    @classmethod
    def from_sources(
        cls,
        values: Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> CacheConfig:
        """Build from a dict and the environment; dict entries beat env vars.

        Dict keys are field names (case-insensitive); an unknown key is an error,
        because a silently ignored typo is the worst kind of misconfiguration.
        """
        environ = os.environ if environ is None else environ
        by_name = {f.name: f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            env_name = ENV_PREFIX + f.metadata["env"]
            if env_name in environ:
                kwargs[f.name] = _coerce(f, environ[env_name], source=env_name)
        for key, raw in (values or {}).items():
            name = str(key).lower()
            if name.startswith(ENV_PREFIX.lower()):
                name = name[len(ENV_PREFIX) :]
                name = next(
                    (n for n, f in by_name.items() if f.metadata["env"].lower() == name), name
                )
            if name not in by_name:
                raise ConfigError(
                    f"unknown config key {key!r}; known keys: {', '.join(sorted(by_name))}"
                )
            kwargs[name] = _coerce(by_name[name], raw, source=name)
        return cls(**kwargs)

    def replace(self, **changes: Any) -> CacheConfig:
        return dataclasses.replace(self, **changes)

    # -- helpers ---------------------------------------------------------------
    def _check_backend_specific_fields(self) -> None:
        """A field of one backend, set while another backend is chosen, is an error.

        "Set" means different from the field's default (from the dict or the
        environment alike); a value equal to the default cannot be told apart.
        The value is not printed: it may be a password.
        """
        for f in fields(self):
            backend = f.metadata.get("backend")
            if backend is None or backend == self.l2_cache_backend:
                continue
            if getattr(self, f.name) != f.default:
                raise ConfigError(
                    f"{f.name} is set but l2_cache_backend={self.l2_cache_backend}; "
                    f"it only applies to {backend}"
                )

    def _check_positive(self, name: str, *, allow_zero: bool) -> None:
        v = getattr(self, name)
        if v < 0 or (v == 0 and not allow_zero):
            bound = ">= 0" if allow_zero else "> 0"
            raise ConfigError(f"{name}={v!r} must be {bound}")

    def _check_range(self, name: str, lo: float, hi: float, *, inclusive: bool) -> None:
        v = getattr(self, name)
        ok = lo <= v <= hi if inclusive else lo < v < hi
        if not ok:
            br = "[]" if inclusive else "()"
            raise ConfigError(f"{name}={v!r} must be in {br[0]}{lo}, {hi}{br[1]}")


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _coerce(f: dataclasses.Field[Any], raw: Any, *, source: str) -> Any:
    """Convert ``raw`` to the field's declared type or raise naming ``source``."""
    typ = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if typ == "bool":
            if isinstance(raw, bool):
                return raw
            s = str(raw).strip().lower()
            if s in _TRUE:
                return True
            if s in _FALSE:
                return False
            raise ValueError("expected a boolean (true/false/1/0)")
        if typ == "int":
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError("expected an integer")
            return int(raw)
        if typ == "float":
            if isinstance(raw, bool):
                raise ValueError("expected a number")
            return float(raw)
        if typ == "str":
            if not isinstance(raw, str):
                raise ValueError("expected a string")
            return raw
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}={raw!r}: {e}") from None
    raise ConfigError(f"{source}: unsupported field type {typ}")


def describe_fields() -> list[dict[str, Any]]:
    """Field table used to generate/check docs/configuration.md."""
    out = []
    for f in fields(CacheConfig):
        out.append(
            {
                "name": f.name,
                "env": ENV_PREFIX + f.metadata["env"],
                "type": f.type if isinstance(f.type, str) else f.type.__name__,
                "default": f.default,
                "doc": f.metadata["doc"],
                "choices": f.metadata.get("choices"),
                "backend": f.metadata.get("backend"),
            }
        )
    return out
