"""Detects the vllm_aibrix patch set in the vLLM that is imported.

The patches in ``patches/vllm-<version>/`` change vLLM's own sources (applied
with ``scripts/apply_patches.sh``); nothing here patches vLLM at run time.
Each patch leaves a module-level marker that says it is present, so the
connector can choose between features at startup instead of failing later:

* ``vllm.v1.core.block_pool.KV_EVICTION_LISTENER_VERSION`` (patch 0001): the
  GPU block pool accepts ``BlockPool.set_kv_eviction_listener(listener)`` and
  calls a :class:`KVEvictionListener` when cached blocks leave its prefix
  cache.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_utils import BlockHashWithGroupId

#: The listener protocol this package is written against. The patch bumps its
#: marker when the calls change, so an old patched vLLM is refused, not misused.
KV_EVICTION_LISTENER_VERSION = 1

#: What users run to patch the installed vLLM (from a vllm_aibrix checkout).
APPLY_COMMAND = "scripts/apply_patches.sh"

_BLOCK_POOL_MODULE = "vllm.v1.core.block_pool"
_MARKER = "KV_EVICTION_LISTENER_VERSION"


class PatchNotAppliedError(RuntimeError):
    """A feature needs a vllm_aibrix patch that the imported vLLM lacks."""


class KVEvictionListener(Protocol):
    """What a patched ``BlockPool`` calls (see ``set_kv_eviction_listener``).

    Both calls run inside the block pool, on the scheduler's thread, while it
    allocates or resets: they must be quick and must not raise (an exception
    would propagate into vLLM's scheduler step), and must not call back into
    the block pool.
    """

    def on_cached_blocks_evicted(
        self, block_ids: list[int], block_hashes: list[BlockHashWithGroupId]
    ) -> None:
        """Cached blocks left the prefix cache and are about to be reused.

        ``block_ids[i]`` lost the prefix-cache key ``block_hashes[i]`` (the
        block hash bytes followed by a 4-byte KV-cache group id; split with
        ``vllm.v1.core.kv_cache_utils.get_block_hash`` / ``get_group_id``).
        The lists have equal length; a block with several keys (partial-block
        entries) appears once per key. The call comes before the blocks are
        handed to their new owner: their contents are still the evicted KV
        until the next forward pass writes into them.
        """

    def on_prefix_cache_cleared(self) -> None:
        """``reset_prefix_cache`` succeeded: every cached key was dropped at once."""


def eviction_listener_version() -> int | None:
    """Return the eviction-listener patch version in the imported vLLM, or None.

    None when vLLM cannot be imported or its block pool is stock.
    """
    try:
        module = importlib.import_module(_BLOCK_POOL_MODULE)
    except ImportError:
        return None
    version = getattr(module, _MARKER, None)
    return version if isinstance(version, int) else None


def eviction_listener_available() -> bool:
    """Whether the imported vLLM's block pool has the listener this package expects."""
    return eviction_listener_version() == KV_EVICTION_LISTENER_VERSION


def require_eviction_listener(feature: str = "offload_trigger=gpu_evict") -> None:
    """Raise :class:`PatchNotAppliedError` unless the eviction listener is present.

    ``feature`` names what needs it, for the message.
    """
    found = eviction_listener_version()
    if found == KV_EVICTION_LISTENER_VERSION:
        return
    where = _describe_vllm()
    if found is None:
        problem = "lacks the vllm_aibrix block-pool eviction-listener patch"
    else:
        problem = (
            f"has eviction-listener patch version {found}, but this vllm_aibrix "
            f"needs version {KV_EVICTION_LISTENER_VERSION}"
        )
        # A different patch version is a stale checkout's patch: undo it with
        # that checkout, or reinstall vLLM, before applying this one.
    raise PatchNotAppliedError(
        f"{feature} needs a patched vLLM, but {where} {problem}. Apply the patch set "
        f"with `{APPLY_COMMAND}` from the vllm_aibrix checkout (it patches the vllm "
        f"that `.venv/bin/python` imports; `--python PY` picks another interpreter, "
        f"`{APPLY_COMMAND} --check` reports the state), then restart vLLM. "
        "Without the patch, use offload_trigger=compute."
    )


def _describe_vllm() -> str:
    try:
        import vllm
    except ImportError:
        return "vLLM (not importable)"
    version = getattr(vllm, "__version__", "unknown version")
    return f"vLLM {version} at {getattr(vllm, '__file__', '?')}"
