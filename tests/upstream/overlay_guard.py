"""A pytest plugin (``-p tests.upstream.overlay_guard``) for runs on a vLLM overlay.

Refuses to run unless ``vllm`` really is the overlay named by
``AIBRIX_OVERLAY_ROOT`` with version ``AIBRIX_OVERLAY_VERSION``: a run that
silently imported the installed vLLM instead would pass without testing the
release it claims to.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def pytest_configure(config: pytest.Config) -> None:
    """Check which vLLM this process imports before any test module loads."""
    root = os.environ.get("AIBRIX_OVERLAY_ROOT")
    want = os.environ.get("AIBRIX_OVERLAY_VERSION")
    if not root or not want:
        raise pytest.UsageError(
            "overlay_guard needs AIBRIX_OVERLAY_ROOT and AIBRIX_OVERLAY_VERSION"
        )
    import vllm
    import vllm.v1.core.sched.scheduler as scheduler

    for mod in (vllm, scheduler):
        path = Path(mod.__file__ or "")
        if not path.is_relative_to(Path(root)):
            raise pytest.UsageError(f"{mod.__name__} comes from {path}, not the overlay {root}")
    if vllm.__version__ != want:
        raise pytest.UsageError(f"overlay vllm is {vllm.__version__}, expected {want}")
    print(f"overlay_guard: vllm {vllm.__version__} from {Path(vllm.__file__ or '').parent}")
