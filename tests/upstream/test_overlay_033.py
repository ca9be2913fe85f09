"""vLLM 0.33.0's scheduler, KV cache manager and block pool, driven by our tests.

vLLM 0.33.0 has no CPU build (it needs torch 2.14), but its scheduler side is
pure Python. ``overlay_033`` is a vllm tree with every ``.py`` file of the
0.33.0 CUDA wheel over the installed 0.32.0 package's compiled extensions
(tests/upstream/overlay.py); one subprocess puts it first on ``PYTHONPATH``
and runs, on it (each suite's outcome is one test here):

* tests/upstream/test_patched_block_pool.py: 0.33.0's block_pool.py, patched
  (patches/vllm-0.33.0), behaves as 0.32.0's does;
* tests/sim: the scheduler-half simulation (vLLM's real ``Scheduler`` with our
  connector; every served KV value checked), a short run: an upstream change
  to the scheduler/connector contract fails here, not in a deployment.

``AIBRIX_UPSTREAM_SIM_STEPS`` / ``AIBRIX_UPSTREAM_SIM_SEEDS`` lengthen the
simulation (defaults 100 steps, seed 3; the stock run uses seeds 1,2).
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from tests.upstream.conftest import REPO

SIM_STEPS = os.environ.get("AIBRIX_UPSTREAM_SIM_STEPS", "100")
SIM_SEEDS = os.environ.get("AIBRIX_UPSTREAM_SIM_SEEDS", "3")


def _pytest_on_overlay(overlay: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = dict(os.environ)
    environ.update(env)
    environ["PYTHONPATH"] = os.pathsep.join(
        [str(overlay), str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    environ["AIBRIX_OVERLAY_ROOT"] = str(overlay)
    environ["AIBRIX_OVERLAY_VERSION"] = "0.33.0"
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p"]
    cmd += ["tests.upstream.overlay_guard", "-q", "-rfE", *args]
    return subprocess.run(
        cmd, cwd=REPO, env=environ, capture_output=True, text=True, check=False, timeout=900
    )


def _report(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"


@pytest.fixture(scope="module")
def run_033(
    overlay_033: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[subprocess.CompletedProcess[str], dict[str, list[str]]]:
    """One subprocess for both suites: importing vLLM is most of its time.

    Returns the process and, per test module, the outcome of each of its tests.
    """
    xml = tmp_path_factory.mktemp("overlay-033-run") / "junit.xml"
    proc = _pytest_on_overlay(
        overlay_033,
        "tests/upstream/test_patched_block_pool.py",
        "tests/sim",
        f"--junitxml={xml}",
        AIBRIX_SIM_STEPS=SIM_STEPS,
        AIBRIX_SIM_SEEDS=SIM_SEEDS,
    )
    outcomes: dict[str, list[str]] = {}
    if xml.exists():
        for case in ET.parse(xml).getroot().iter("testcase"):
            # Module-level tests: classname is the dotted module path.
            module = case.get("classname", "")
            kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
            outcomes.setdefault(module, []).append(kinds[0] if kinds else "passed")
    return proc, outcomes


def _check(run: tuple[subprocess.CompletedProcess[str], dict[str, list[str]]], prefix: str) -> None:
    proc, outcomes = run
    assert "overlay_guard: vllm 0.33.0" in proc.stdout, _report(proc)
    mine = [o for module, got in outcomes.items() if module.startswith(prefix) for o in got]
    assert mine, f"no {prefix} tests ran\n{_report(proc)}"
    assert set(mine) == {"passed"}, _report(proc)


def test_patched_block_pool_033(run_033: Any) -> None:
    _check(run_033, "tests.upstream.test_patched_block_pool")


def test_scheduler_simulation_033(run_033: Any) -> None:
    _check(run_033, "tests.sim.")
