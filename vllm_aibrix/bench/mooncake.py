"""MooncakeBackend vs Mooncake's own batch calls, same run, same server.

Starts a private Mooncake Store on 127.0.0.1 (master + one storage node),
then, in one client process, times for each value size:

* ``backend put``: :meth:`MooncakeBackend.put_many` of ``--batch`` values;
* ``raw put``: ``batch_upsert_from`` of the same values from a registered
  buffer (Mooncake's fastest write path);
* ``backend get``: :meth:`MooncakeBackend.get_many` (sizes from the master,
  values read into memory the backend allocates);
* ``backend get_into``: :meth:`MooncakeBackend.get_into` (zero-copy into
  caller buffers);
* ``raw get``: ``batch_get_into`` into a registered buffer.

``ratio = backend GB/s / raw GB/s`` (best of ``--repeats``). Run:
``python -m vllm_aibrix.bench.mooncake`` (or ``python -m vllm_aibrix.bench
mooncake``).

Loopback only: the cluster comes from ``tests/integration/mooncake_cluster.py``
(the launcher of the integration tests, with its bind-to-loopback
``LD_PRELOAD`` library), so this benchmark runs from a source checkout only.
The measuring client listens too, so it runs in a child process started
with that library.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vllm_aibrix.bench._common import add_output_args, emit

KIB = 1024
DEFAULT_VALUE_KIB = (64, 512, 2048)

# The cluster launcher and its bind-to-loopback shim are test infrastructure and
# live in tests/ (not in the installed package); the benchmark loads that file
# from the source checkout this package is imported from (an editable install).
_CHECKOUT = Path(__file__).resolve().parents[2]
_CLUSTER_FILE = _CHECKOUT / "tests" / "integration" / "mooncake_cluster.py"


def _cluster_module() -> Any:
    """``tests/integration/mooncake_cluster.py`` of this checkout, loaded by path."""
    name = "_aibrix_mooncake_cluster"
    if name in sys.modules:
        return sys.modules[name]
    if not _CLUSTER_FILE.is_file():
        raise RuntimeError(
            f"the mooncake benchmark starts its cluster with {_CLUSTER_FILE}, which is not "
            "there: run it from a source checkout (pip install -e .)"
        )
    spec = importlib.util.spec_from_file_location(name, _CLUSTER_FILE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# -- the measurement (runs in a loopback-confined child) ----------------------------
def _measure(cfg: dict[str, Any], value_kib: Sequence[int], batch: int, repeats: int) -> list[dict]:
    import numpy as np
    from mooncake.store import MooncakeDistributedStore

    from vllm_aibrix.core.config import CacheConfig
    from vllm_aibrix.core.l2.mooncake import MooncakeBackend

    backend = MooncakeBackend(CacheConfig.from_sources(cfg, environ={}))
    raw = MooncakeDistributedStore()
    rc = raw.setup(
        "127.0.0.1",
        cfg["mooncake_metadata_server"],
        0,
        cfg["mooncake_local_buffer_size_mb"] << 20,
        "tcp",
        "",
        cfg["mooncake_master"],
    )
    if rc != 0:
        raise RuntimeError(f"raw client setup failed: {rc}")
    rows = []
    rng = np.random.default_rng(0)
    for kib in value_kib:
        size = kib * KIB
        total = size * batch
        keys = [f"bench-{kib}-{i}".encode() for i in range(batch)]
        skeys = [k.hex() for k in keys]  # the backend's key mapping, so both read the same
        values = [rng.integers(0, 256, size, dtype=np.uint8).tobytes() for _ in range(batch)]
        items = list(zip(keys, values, strict=True))
        src = np.frombuffer(b"".join(values), dtype=np.uint8).copy()
        dst = np.zeros(total, dtype=np.uint8)
        raw.register_buffer(src.ctypes.data, src.nbytes)
        raw.register_buffer(dst.ctypes.data, dst.nbytes)
        ptrs = [src.ctypes.data + i * size for i in range(batch)]
        dptrs = [dst.ctypes.data + i * size for i in range(batch)]
        sizes = [size] * batch
        bufs = [memoryview(dst[i * size : (i + 1) * size].data) for i in range(batch)]

        def raw_put() -> None:
            codes = raw.batch_upsert_from(skeys, ptrs, sizes)  # noqa: B023
            assert all(c == 0 for c in codes), codes

        def raw_get() -> None:
            codes = raw.batch_get_into(skeys, dptrs, sizes)  # noqa: B023
            assert all(c == size for c in codes), codes  # noqa: B023

        def be_put() -> None:
            backend.put_many(items)  # noqa: B023

        def be_get() -> None:
            got = backend.get_many(keys)  # noqa: B023
            assert all(v is not None and len(v) == size for v in got)  # noqa: B023

        def be_get_into() -> None:
            n = backend.get_into(keys, bufs)  # noqa: B023
            assert all(x == size for x in n)  # noqa: B023

        # Rounds interleave all five so that drift on a shared machine hits every
        # side alike; each keeps its fastest (least disturbed) round.
        ops = {
            "raw_put": raw_put,
            "backend_put": be_put,
            "raw_get": raw_get,
            "backend_get": be_get,
            "backend_get_into": be_get_into,
        }
        t = {name: float("inf") for name in ops}
        for fn in ops.values():
            fn()  # warm-up
        for _ in range(repeats):
            for name, fn in ops.items():
                t0 = time.perf_counter()
                fn()
                t[name] = min(t[name], time.perf_counter() - t0)
        backend.get_into(keys, bufs)
        assert bytes(dst[:size]) == values[0], "read back wrong bytes"

        def gbps(sec: float, total: int = total) -> float:
            return round(total / sec / 1e9, 3)

        rows.append(
            {
                "value_kib": kib,
                "batch": batch,
                "bytes_per_op": total,
                "raw_put_gbps": gbps(t["raw_put"]),
                "backend_put_gbps": gbps(t["backend_put"]),
                "put_ratio": round(t["raw_put"] / t["backend_put"], 3),
                "raw_get_gbps": gbps(t["raw_get"]),
                "backend_get_gbps": gbps(t["backend_get"]),
                "get_ratio": round(t["raw_get"] / t["backend_get"], 3),
                "backend_get_into_gbps": gbps(t["backend_get_into"]),
                "get_into_ratio": round(t["raw_get"] / t["backend_get_into"], 3),
            }
        )
        backend.delete(keys)
        raw.unregister_buffer(src.ctypes.data)
        raw.unregister_buffer(dst.ctypes.data)
    backend.close()
    raw.close()
    return rows


def _run(args: argparse.Namespace) -> dict[str, Any]:
    import platform

    needed_mb = max(args.value_kib) * args.batch // 1024
    with tempfile.TemporaryDirectory(prefix="aibrix-mc-bench-") as tmp:
        cluster = _cluster_module().MooncakeCluster(tmp, segment_mb=max(512, 4 * needed_mb))
        with cluster:
            cfg = cluster.client_config(
                mooncake_local_buffer_size_mb=max(64, 2 * needed_mb),
                l2_cache_op_timeout_ms=30000,
            )
            spec = json.dumps(
                {
                    "cfg": cfg,
                    "value_kib": args.value_kib,
                    "batch": args.batch,
                    "repeats": args.repeats,
                }
            )
            # The measuring client listens too: it must run with the loopback library.
            proc = subprocess.run(
                [sys.executable, "-m", "vllm_aibrix.bench.mooncake", "--_child", spec],
                env=cluster.env,
                capture_output=True,
                text=True,
                timeout=600,
            )
            if proc.returncode != 0:
                raise RuntimeError(f"benchmark client failed:\n{proc.stderr[-4000:]}")
            rows = json.loads(proc.stdout.strip().splitlines()[-1])
    return {
        "benchmark": "mooncake",
        "what": "MooncakeBackend vs raw MooncakeDistributedStore batch calls, one client, "
        "same master + storage node on 127.0.0.1 (TCP)",
        "ratio": "raw seconds / backend seconds (1.0 = as fast as raw; goal >= 0.8)",
        "repeats": args.repeats,
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
        },
        "results": rows,
    }


def _add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--value-kib", nargs="+", type=int, default=list(DEFAULT_VALUE_KIB))
    p.add_argument("--batch", type=int, default=16, help="values per batched call")
    p.add_argument("--repeats", type=int, default=7, help="best of this many timed calls")
    add_output_args(p)


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``mooncake`` subcommand."""
    p = subparsers.add_parser("mooncake", help="MooncakeBackend vs raw Mooncake batch calls")
    _add_args(p)
    p.set_defaults(func=_run)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vllm_aibrix.bench.mooncake [--value-kib ...] [--batch N]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--_child"]:
        spec = json.loads(argv[1])
        rows = _measure(spec["cfg"], spec["value_kib"], spec["batch"], spec["repeats"])
        sys.stdout.write(json.dumps(rows) + "\n")
        return 0
    parser = argparse.ArgumentParser(
        prog="python -m vllm_aibrix.bench.mooncake", description=__doc__
    )
    _add_args(parser)
    args = parser.parse_args(argv)
    emit(_run(args), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
