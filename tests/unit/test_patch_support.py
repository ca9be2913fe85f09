"""Unit tests of vllm_aibrix.vllm.patch_support (detection of the vLLM patch set).

The block-pool module is replaced in ``sys.modules`` by a stand-in with or
without the marker, so these tests neither depend on whether the installed
vLLM is patched (CI may patch it for a second e2e pass) nor import vLLM.
The patched block pool's behaviour is tested in tests/upstream.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from vllm_aibrix.vllm import patch_support
from vllm_aibrix.vllm.patch_support import (
    APPLY_COMMAND,
    KV_EVICTION_LISTENER_VERSION,
    PatchNotAppliedError,
    eviction_listener_available,
    eviction_listener_version,
    require_eviction_listener,
)

MODULE = "vllm.v1.core.block_pool"


def _fake_vllm(monkeypatch: pytest.MonkeyPatch, marker: object | None) -> None:
    block_pool = types.ModuleType(MODULE)
    if marker is not None:
        block_pool.KV_EVICTION_LISTENER_VERSION = marker  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, MODULE, block_pool)
    vllm = types.ModuleType("vllm")
    vllm.__version__ = "9.9.9"  # type: ignore[attr-defined]
    vllm.__file__ = "/somewhere/vllm/__init__.py"
    monkeypatch.setitem(sys.modules, "vllm", vllm)


def test_stock_vllm_is_detected_and_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_vllm(monkeypatch, None)
    assert eviction_listener_version() is None
    assert not eviction_listener_available()
    with pytest.raises(PatchNotAppliedError) as err:
        require_eviction_listener()
    msg = str(err.value)
    assert APPLY_COMMAND == "scripts/apply_patches.sh"
    assert APPLY_COMMAND in msg
    assert "offload_trigger=gpu_evict" in msg
    assert "vLLM 9.9.9 at /somewhere/vllm/__init__.py" in msg
    assert "lacks" in msg


def test_patched_vllm_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_vllm(monkeypatch, KV_EVICTION_LISTENER_VERSION)
    assert eviction_listener_version() == KV_EVICTION_LISTENER_VERSION
    assert eviction_listener_available()
    require_eviction_listener()  # does not raise


@pytest.mark.parametrize("marker", [KV_EVICTION_LISTENER_VERSION + 1, "1"])
def test_other_patch_version_is_refused(monkeypatch: pytest.MonkeyPatch, marker: object) -> None:
    # A future (or stale) patch may call the listener differently: never guess.
    _fake_vllm(monkeypatch, marker)
    assert not eviction_listener_available()
    with pytest.raises(PatchNotAppliedError, match=r"apply_patches\.sh"):
        require_eviction_listener("my feature")
    if isinstance(marker, int):
        with pytest.raises(PatchNotAppliedError, match=f"patch version {marker}"):
            require_eviction_listener()


def test_unimportable_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes the import raise ImportError.
    monkeypatch.setitem(sys.modules, MODULE, None)
    monkeypatch.setitem(sys.modules, "vllm", None)
    assert eviction_listener_version() is None
    assert not eviction_listener_available()
    with pytest.raises(PatchNotAppliedError, match=r"vLLM \(not importable\)"):
        require_eviction_listener()


def test_listener_protocol_and_marker_match_the_patch() -> None:
    # The patch calls these two names and sets this marker; a change on either
    # side must fail here, not in a deployment.
    names = {n for n in vars(patch_support.KVEvictionListener) if n.startswith("on_")}
    assert names == {"on_cached_blocks_evicted", "on_prefix_cache_cleared"}
    patches = sorted((Path(__file__).parents[2] / "patches").glob("vllm-*/0001-*.patch"))
    assert patches, "no eviction-listener patch found"
    for path in patches:
        text = path.read_text()
        assert f"+KV_EVICTION_LISTENER_VERSION = {KV_EVICTION_LISTENER_VERSION}\n" in text
        for name in names:
            assert f"._kv_eviction_listener.{name}(" in text, (path, name)
