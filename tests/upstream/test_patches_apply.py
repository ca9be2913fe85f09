"""The patch set applies strictly to every supported release, and apply_patches.sh works.

Everything runs on temporary copies: neither the cached release sources nor
the installed vLLM are ever modified here.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.upstream.conftest import (
    VERSIONS,
    installed_site_dir,
    installed_version,
    run_apply,
)

BLOCK_POOL = Path("vllm/v1/core/block_pool.py")


def _copy_release(src: Path, dest: Path) -> Path:
    # Only what the patches touch, plus _version.py for version detection.
    for rel in (BLOCK_POOL, Path("vllm/_version.py")):
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / rel, dest / rel)
    return dest


def test_versions_are_supported() -> None:
    assert {"0.32.0", "0.33.0"} <= set(VERSIONS)


@pytest.mark.parametrize("version", VERSIONS)
def test_patch_applies_strictly_to_release_sources(
    version: str, vllm_sources: dict[str, Path]
) -> None:
    # --check on the pristine wheel sources: exit 1 = not applied, applies
    # cleanly (patch -F0: line offsets allowed, fuzz not). The version comes
    # from the sources' own _version.py.
    proc = run_apply("--check", "--target", vllm_sources[version])
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"vLLM {version} in" in proc.stdout
    assert "applies cleanly" in proc.stdout


@pytest.mark.parametrize("version", VERSIONS)
def test_apply_check_idempotent_reverse(
    version: str, vllm_sources: dict[str, Path], tmp_path: Path
) -> None:
    tree = _copy_release(vllm_sources[version], tmp_path)
    pristine = (tree / BLOCK_POOL).read_bytes()

    proc = run_apply("--target", tree)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    patched = (tree / BLOCK_POOL).read_bytes()
    assert patched != pristine
    assert b"\nKV_EVICTION_LISTENER_VERSION = 1\n" in patched
    assert not list(tree.rglob("*.orig")) and not list(tree.rglob("*.rej"))

    proc = run_apply("--check", "--target", tree)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "patched" in proc.stdout

    proc = run_apply("--target", tree)  # again: a no-op that says so
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "already applied" in proc.stdout
    assert (tree / BLOCK_POOL).read_bytes() == patched

    proc = run_apply("--reverse", "--target", tree)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tree / BLOCK_POOL).read_bytes() == pristine

    proc = run_apply("--reverse", "--target", tree)  # again: a no-op
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "nothing to reverse" in proc.stdout
    assert run_apply("--check", "--target", tree).returncode == 1


def test_changed_upstream_context_fails_naming_the_hunk(
    vllm_sources: dict[str, Path], tmp_path: Path
) -> None:
    # Simulate an upstream release that changed a line the patch relies on.
    tree = _copy_release(vllm_sources[VERSIONS[-1]], tmp_path)
    path = tree / BLOCK_POOL
    text = path.read_text()
    anchor = "        self._emit_block_removed_events(evicted_hashes)\n        return True\n"
    assert text.count(anchor) == 1
    changed = text.replace(
        anchor,
        "        self._emit_block_removed_events(evicted_hashes)\n"
        "        self._upstream_did_something_new(block)\n"
        "        return True\n",
    )
    path.write_text(changed)

    for mode in ("--check", None):
        proc = run_apply(*([mode] if mode else []), "--target", tree)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "0001-block-pool-eviction-listener.patch does not apply" in proc.stderr
        assert "Hunk #5 FAILED" in proc.stderr
        assert "failing hunk #5:" in proc.stderr
        assert "def _maybe_evict_cached_block" in proc.stderr  # the hunk is named
        # The other hunks still applied in the dry run, but nothing was written.
        assert path.read_text() == changed


def test_fuzz_is_not_accepted(vllm_sources: dict[str, Path], tmp_path: Path) -> None:
    # GNU patch would apply this with fuzz 1 by default; strict mode refuses.
    tree = _copy_release(vllm_sources[VERSIONS[0]], tmp_path)
    path = tree / BLOCK_POOL
    text = path.read_text()
    old = "        # In order to only iterate the list once, we duplicated code a bit\n"
    assert text.count(old) == 1
    path.write_text(text.replace(old, "        # Iterate the list once (reworded upstream).\n"))
    proc = run_apply("--check", "--target", tree)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "def get_new_blocks" in proc.stderr


def test_unsupported_version_is_refused(tmp_path: Path, vllm_sources: dict[str, Path]) -> None:
    tree = _copy_release(vllm_sources[VERSIONS[0]], tmp_path)
    proc = run_apply("--check", "--target", tree, "--version", "0.0.1")
    assert proc.returncode == 4
    assert "no patch directory for vLLM 0.0.1" in proc.stderr
    assert f"Supported versions: {' '.join(VERSIONS)}." in proc.stderr
    before = (tree / BLOCK_POOL).read_bytes()
    assert run_apply("--target", tree, "--version", "0.0.1").returncode == 4
    assert (tree / BLOCK_POOL).read_bytes() == before


def test_installed_vllm_state_is_known() -> None:
    # The installed release has a patch directory and is either stock (1) or
    # fully patched (0); anything else means someone left it half patched.
    assert installed_version() in VERSIONS
    proc = run_apply("--check", "--target", installed_site_dir())
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr
