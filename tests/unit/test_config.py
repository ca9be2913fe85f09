"""CacheConfig: validation names the field; env parsing; dict beats env."""

from __future__ import annotations

from typing import Any

import pytest

from vllm_aibrix.core.config import ENV_PREFIX, CacheConfig, ConfigError

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
