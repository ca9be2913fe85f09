"""``python -m vllm_aibrix.bench <subcommand> ...``: run one benchmark, print JSON."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence

import vllm_aibrix.bench as _pkg
from vllm_aibrix.bench._common import emit


def build_parser() -> argparse.ArgumentParser:
    """One subcommand per ``register`` found in this package's modules."""
    parser = argparse.ArgumentParser(prog="python -m vllm_aibrix.bench", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="BENCHMARK")
    for info in sorted(pkgutil.iter_modules(_pkg.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{_pkg.__name__}.{info.name}")
        register = getattr(module, "register", None)
        if callable(register):
            register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point (also the ``vllm-aibrix-bench`` console script)."""
    args = build_parser().parse_args(argv)
    result = args.func(args)
    emit(result, getattr(args, "out", None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
