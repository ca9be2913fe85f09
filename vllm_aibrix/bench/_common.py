"""Helpers shared by the benchmark modules."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

Handler = Callable[[argparse.Namespace], dict[str, Any]]


def add_output_args(parser: argparse.ArgumentParser) -> None:
    """``--json`` / ``--out``: every subcommand accepts them."""
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object (the default output anyway)"
    )
    parser.add_argument("--out", default=None, help="write the JSON to this file instead of stdout")


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import torch

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def emit(result: dict[str, Any], out: str | None) -> None:
    """Write ``result`` as JSON to ``out`` (a path) or stdout."""
    text = json.dumps(result, indent=2, sort_keys=False)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
    else:
        sys.stdout.write(text + "\n")


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """Fastest of ``repeats`` timed calls in seconds (after one warm-up call).

    The minimum is the least disturbed run, which is what we want on a
    machine shared with other work.
    """
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best
