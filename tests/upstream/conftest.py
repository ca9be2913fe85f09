"""Fixtures of the upstream-regression tests: vLLM release sources, once per session.

The Python sources of the CUDA wheels of every supported release come from
``scripts/fetch_vllm_sources.py`` (cached outside the checkout). When the
download fails the tests that need them are skipped with the reason, except
under CI (``CI=true``), where they fail: a regression guard that silently
skips guards nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.upstream import overlay

REPO = Path(__file__).resolve().parents[2]
FETCH = REPO / "scripts" / "fetch_vllm_sources.py"
APPLY = REPO / "scripts" / "apply_patches.sh"
#: Every release with a patch directory is checked.
VERSIONS = sorted(p.name.removeprefix("vllm-") for p in (REPO / "patches").glob("vllm-*"))


def in_ci() -> bool:
    """Whether this run is CI's (.ci/run sets CI=true)."""
    return os.environ.get("CI", "").lower() == "true"


def installed_site_dir() -> Path:
    """The directory holding the installed ``vllm`` package (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    assert spec is not None and spec.submodule_search_locations, "vllm is not installed"
    return Path(next(iter(spec.submodule_search_locations))).parent


def installed_version() -> str:
    """The installed vLLM release, read as apply_patches.sh reads it."""
    text = (installed_site_dir() / "vllm" / "_version.py").read_text()
    for line in text.splitlines():
        if line.startswith("__version__ = version = "):
            return line.split("=")[-1].strip().strip("'\"").split("+")[0]
    raise AssertionError("no __version__ in the installed vllm/_version.py")


def run_apply(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run scripts/apply_patches.sh with ``args``; never raises on its exit code."""
    return subprocess.run(
        ["bash", str(APPLY), *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


@pytest.fixture(scope="session")
def vllm_sources() -> dict[str, Path]:
    """Version -> directory holding that release's unpacked ``vllm/`` sources."""
    proc = subprocess.run(
        [sys.executable, str(FETCH), *VERSIONS],
        capture_output=True,
        text=True,
        check=False,
        timeout=1200,
    )
    if proc.returncode != 0:
        reason = (
            f"cannot fetch the vLLM {', '.join(VERSIONS)} wheel sources with {FETCH.name} "
            f"(exit {proc.returncode}): {proc.stderr.strip()[-1500:]}"
        )
        if in_ci():
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    dirs = [Path(line) for line in proc.stdout.split()]
    assert len(dirs) == len(VERSIONS), proc.stdout
    return dict(zip(VERSIONS, dirs, strict=True))


@pytest.fixture(scope="session")
def overlay_033(vllm_sources: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``vllm`` tree with every .py of 0.33.0 over the installed package's binaries.

    Returns the directory to put first on ``PYTHONPATH`` (in a subprocess).
    """
    root = tmp_path_factory.mktemp("vllm-0.33.0-overlay")
    overlay.build_overlay(
        installed_site_dir() / "vllm", vllm_sources["0.33.0"] / "vllm", ["."], root
    )
    return root
