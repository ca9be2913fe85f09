"""Benchmarks, run as ``python -m vllm_aibrix.bench <name> ... --json``.

Every module of this package that defines ``register(subparsers)`` adds its
subcommand(s) automatically (see :mod:`vllm_aibrix.bench.__main__`); a new
benchmark is one new module, nothing else to edit. A subcommand's handler
returns a JSON-serialisable dict, which the runner writes to stdout or to
``--out``.
"""
