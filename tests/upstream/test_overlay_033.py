"""vLLM 0.33.0's scheduler, KV cache manager and block pool, driven by our tests.

vLLM 0.33.0 has no CPU build (it needs torch 2.14), but its scheduler side is
pure Python. ``overlay_033`` is a vllm tree with every ``.py`` file of the
0.33.0 CUDA wheel over the installed 0.32.0 package's compiled extensions
(tests/upstream/overlay.py); a subprocess puts it first on ``PYTHONPATH`` and
runs, on it:

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
from pathlib import Path

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
    cmd += ["tests.upstream.overlay_guard", "-x", "-q", "-rfE", *args]
    return subprocess.run(
        cmd, cwd=REPO, env=environ, capture_output=True, text=True, check=False, timeout=900
    )


def _report(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"


def test_patched_block_pool_033(overlay_033: Path) -> None:
    proc = _pytest_on_overlay(overlay_033, "tests/upstream/test_patched_block_pool.py")
    assert proc.returncode == 0, _report(proc)
    assert "overlay_guard: vllm 0.33.0" in proc.stdout
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, _report(proc)


def test_scheduler_simulation_033(overlay_033: Path) -> None:
    proc = _pytest_on_overlay(
        overlay_033, "tests/sim", AIBRIX_SIM_STEPS=SIM_STEPS, AIBRIX_SIM_SEEDS=SIM_SEEDS
    )
    assert proc.returncode == 0, _report(proc)
    assert "overlay_guard: vllm 0.33.0" in proc.stdout
    assert " passed" in proc.stdout, _report(proc)
