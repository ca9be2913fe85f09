"""CacheConfig: validation names the field; env parsing; dict beats env;
a backend-specific field set for another backend is an error."""

from __future__ import annotations

from typing import Any

import pytest

from vllm_aibrix.core.config import ENV_PREFIX, CacheConfig, ConfigError, describe_fields

BAD_VALUES: list[tuple[str, Any]] = [
    ("l1_cache_capacity_gb", 0),
    ("l1_cache_capacity_gb", -1.0),
    ("s3fifo_small_queue_ratio", 0.0),
    ("s3fifo_small_queue_ratio", 1.0),
    ("s3fifo_move_to_main_threshold", 0),
    ("block_size_tokens", -16),
    ("l2_cache_op_timeout_ms", 0),
    ("l2_cache_ingestion_batch_size", 0),
    ("l2_cache_backend", "nosuchstore"),
    ("l2_cache_ingestion_type", "SOMETIMES"),
    ("l2_cache_compression", "lz77"),
    ("infinistore_port", 70000),
    ("infinistore_connection_type", "UDP"),
    ("l1_cache_eviction_policy", "MRU"),
    ("load_deadline_s", 0),
]


@pytest.mark.parametrize(("field", "value"), BAD_VALUES)
def test_bad_value_raises_config_error_naming_the_field(field: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=field):
        CacheConfig.from_sources({field: value}, environ={})


@pytest.mark.parametrize(
    ("field", "raw"), [("l1_cache_capacity_gb", "lots"), ("redis_cluster", "maybe")]
)
def test_unparsable_value_raises_config_error_naming_the_field(field: str, raw: str) -> None:
    with pytest.raises(ConfigError, match=field):
        CacheConfig.from_sources({field: raw}, environ={})


def test_env_vars_with_prefix_are_parsed_to_field_types() -> None:
    env = {
        ENV_PREFIX + "L1_CACHE_CAPACITY_GB": "2.5",
        ENV_PREFIX + "L1_CACHE_EVICTION_POLICY": "lru",
        ENV_PREFIX + "S3FIFO_MOVE_TO_MAIN_THRESHOLD": "3",
        ENV_PREFIX + "L2_CACHE_BACKEND": "redis",
        ENV_PREFIX + "REDIS_CLUSTER": "true",
        ENV_PREFIX + "L2_CACHE_INGESTION_TYPE": "evicted",
    }
    cfg = CacheConfig.from_sources({}, environ=env)
    assert cfg.l1_cache_capacity_gb == 2.5
    assert cfg.l1_cache_eviction_policy == "lru"
    assert cfg.s3fifo_move_to_main_threshold == 3
    assert cfg.redis_cluster is True
    assert cfg.l2_cache_ingestion_type == "EVICTED"


def test_env_var_without_prefix_is_ignored() -> None:
    cfg = CacheConfig.from_sources({}, environ={"L1_CACHE_CAPACITY_GB": "7"})
    assert cfg.l1_cache_capacity_gb == CacheConfig().l1_cache_capacity_gb


def test_bad_env_value_names_the_env_var() -> None:
    with pytest.raises(ConfigError, match=ENV_PREFIX + "L1_CACHE_CAPACITY_GB"):
        CacheConfig.from_sources({}, environ={ENV_PREFIX + "L1_CACHE_CAPACITY_GB": "x"})


def test_dict_value_beats_env_var() -> None:
    env = {ENV_PREFIX + "L1_CACHE_CAPACITY_GB": "2"}
    cfg = CacheConfig.from_sources({"l1_cache_capacity_gb": 3}, environ=env)
    assert cfg.l1_cache_capacity_gb == 3.0


def test_unknown_key_is_rejected() -> None:
    with pytest.raises(ConfigError, match="l1_cache_capacty_gb"):
        CacheConfig.from_sources({"l1_cache_capacty_gb": 1}, environ={})


def test_defaults_are_valid() -> None:
    assert CacheConfig.from_sources({}, environ={}) == CacheConfig()


# One non-default value for every backend-specific field, and the backend it needs.
BACKEND_FIELDS: list[tuple[str, Any, str]] = [
    ("redis_url", "redis://10.0.0.1:6379/0", "REDIS"),
    ("redis_cluster", True, "REDIS"),
    ("redis_password", "pw", "REDIS"),
    ("memory_store_name", "shared", "MEMORY"),
    ("disk_path", "/tmp/aibrix-l2", "DISK"),
    ("disk_capacity_gb", 2.0, "DISK"),
    ("mooncake_master", "10.0.0.1:50051", "MOONCAKE"),
    ("mooncake_metadata_server", "http://10.0.0.1:8080/metadata", "MOONCAKE"),
    ("mooncake_local_hostname", "10.0.0.2", "MOONCAKE"),
    ("mooncake_global_segment_size_mb", 64, "MOONCAKE"),
    ("mooncake_local_buffer_size_mb", 64, "MOONCAKE"),
    ("infinistore_host", "10.0.0.1", "INFINISTORE"),
    ("infinistore_port", 4000, "INFINISTORE"),
    ("infinistore_connection_type", "RDMA", "INFINISTORE"),
]
# What each backend needs to be valid at all (DISK refuses an empty disk_path).
REQUIRED = {"DISK": {"disk_path": "/tmp/aibrix-l2"}}


def _other_backend(backend: str) -> str:
    return "DISK" if backend != "DISK" else "REDIS"


def test_every_backend_specific_field_is_covered_here() -> None:
    marked = {f["name"] for f in describe_fields() if f["backend"]}
    assert marked == {name for name, _, _ in BACKEND_FIELDS}


def test_redis_url_for_disk_backend_names_field_and_backends() -> None:
    values = {"l2_cache_backend": "DISK", "disk_path": "/tmp/x", "redis_url": "redis://h:1/0"}
    with pytest.raises(
        ConfigError,
        match=r"^redis_url is set but l2_cache_backend=DISK; it only applies to REDIS$",
    ):
        CacheConfig.from_sources(values, environ={})


@pytest.mark.parametrize(("field", "value", "backend"), BACKEND_FIELDS)
def test_backend_field_set_for_another_backend_is_an_error(
    field: str, value: Any, backend: str
) -> None:
    other = _other_backend(backend)
    values = {"l2_cache_backend": other, **REQUIRED.get(other, {}), field: value}
    with pytest.raises(ConfigError, match=rf"^{field} is set .* only applies to {backend}$"):
        CacheConfig.from_sources(values, environ={})


@pytest.mark.parametrize(("field", "value", "backend"), BACKEND_FIELDS)
def test_backend_field_set_for_its_own_backend_is_accepted(
    field: str, value: Any, backend: str
) -> None:
    values = {"l2_cache_backend": backend, **REQUIRED.get(backend, {}), field: value}
    cfg = CacheConfig.from_sources(values, environ={})
    assert getattr(cfg, field) == value


def test_backend_field_set_without_any_l2_backend_is_an_error() -> None:
    with pytest.raises(ConfigError, match="mooncake_master is set but l2_cache_backend=NONE"):
        CacheConfig.from_sources({"mooncake_master": "10.0.0.1:1"}, environ={})


def test_backend_field_from_env_var_counts_as_set() -> None:
    env = {ENV_PREFIX + "L2_CACHE_BACKEND": "MEMORY", ENV_PREFIX + "DISK_PATH": "/tmp/x"}
    with pytest.raises(ConfigError, match="disk_path is set but l2_cache_backend=MEMORY"):
        CacheConfig.from_sources({}, environ=env)


def test_backend_field_equal_to_its_default_is_accepted() -> None:
    default = CacheConfig().redis_url
    cfg = CacheConfig.from_sources({"l2_cache_backend": "MEMORY", "redis_url": default}, environ={})
    assert cfg.redis_url == default


def test_backend_field_error_does_not_print_the_value() -> None:
    with pytest.raises(ConfigError) as err:
        CacheConfig.from_sources({"redis_password": "s3cret-pw"}, environ={})
    assert "s3cret-pw" not in str(err.value)


def test_replace_to_another_backend_keeps_checking_the_fields() -> None:
    cfg = CacheConfig(l2_cache_backend="REDIS", redis_url="redis://h:1/0")
    with pytest.raises(ConfigError, match="redis_url is set but l2_cache_backend=MEMORY"):
        cfg.replace(l2_cache_backend="MEMORY")
