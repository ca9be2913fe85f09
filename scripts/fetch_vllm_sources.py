#!/usr/bin/env python3
"""Fetch the Python sources of upstream vLLM releases for the regression tests.

For each requested version this downloads the CUDA wheel ``vllm==X`` (no
dependencies, no install; about 330 MB) into a cache directory outside the
checkout and unpacks only ``vllm/**/*.py`` into ``<cache>/src/vllm-X/``. The
tests in ``tests/upstream`` dry-run our patches against those sources and run
the scheduler simulation against their scheduler and block pool: there is no
CPU build of every release, but the parts we patch and test are pure Python.

Usage::

    scripts/fetch_vllm_sources.py                 # 0.32.0 and 0.33.0
    scripts/fetch_vllm_sources.py 0.33.0          # just one
    scripts/fetch_vllm_sources.py --print-dir     # print the src dir, fetch nothing

The cache is ``$AIBRIX_VLLM_SRC_CACHE`` or ``~/.cache/vllm_aibrix/wheels``.
Idempotent: a version whose sources are already unpacked is skipped; a wheel
already downloaded is not downloaded again. Exit status 0 when every version
is available, 1 otherwise.

Uses only the standard library so that it runs with any Python 3.10+, and pip
through ``<python> -m pip`` (the interpreter running this script, so the pip
configuration of that environment applies).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

DEFAULT_VERSIONS = ("0.32.0", "0.33.0")
CACHE_ENV = "AIBRIX_VLLM_SRC_CACHE"
# The wheels are ~330 MB each; refuse early rather than fail half-way.
MIN_FREE_BYTES = 1 << 30
# Written last, so a half-unpacked tree (killed mid-way) is never taken as done.
DONE_MARKER = ".complete"


def cache_dir() -> Path:
    """Return the cache root (wheels directly in it, sources under ``src/``)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "vllm_aibrix" / "wheels"


def src_dir(version: str, root: Path | None = None) -> Path:
    """Return where the unpacked sources of ``version`` live."""
    return (root or cache_dir()) / "src" / f"vllm-{version}"


def _log(msg: str) -> None:
    print(f"[fetch_vllm_sources] {msg}", file=sys.stderr, flush=True)


def _find_wheel(root: Path, version: str) -> Path | None:
    wheels = sorted(root.glob(f"vllm-{version}-*.whl"))
    return wheels[0] if wheels else None


def _download(root: Path, version: str) -> Path:
    wheel = _find_wheel(root, version)
    if wheel is not None:
        _log(f"{version}: wheel already downloaded ({wheel.name})")
        return wheel
    free = shutil.disk_usage(root).free
    if free < MIN_FREE_BYTES:
        raise RuntimeError(
            f"only {free / 2**30:.1f} GiB free in {root}; the vllm wheel needs ~0.35 GiB "
            f"(set {CACHE_ENV} to a larger disk)"
        )
    _log(f"{version}: downloading the vllm=={version} wheel (~330 MB, no dependencies)")
    start = time.monotonic()
    # Download into a temp dir first: a killed download must not leave a
    # truncated .whl that a later run would take as complete.
    with tempfile.TemporaryDirectory(dir=root, prefix=".dl-") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--only-binary=:all:",
            "--dest",
            tmp,
            f"vllm=={version}",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(
                f"pip download of vllm=={version} failed (exit {proc.returncode}):\n"
                f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
            )
        got = _find_wheel(Path(tmp), version)
        if got is None:
            raise RuntimeError(f"pip download left no vllm-{version}-*.whl in {tmp}")
        wheel = root / got.name
        os.replace(got, wheel)
    size = wheel.stat().st_size / 2**20
    _log(f"{version}: downloaded {wheel.name} ({size:.0f} MiB) in {time.monotonic() - start:.1f} s")
    return wheel


def _unpack(wheel: Path, dest: Path) -> int:
    # Unpack into a sibling temp dir and rename, so `dest` is complete or absent.
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}-"))
    count = 0
    try:
        with zipfile.ZipFile(wheel) as zf:
            for info in zf.infolist():
                name = info.filename
                if not (name.startswith("vllm/") and name.endswith(".py")):
                    continue
                # Wheels are trusted here, but never write outside the tree.
                target = (tmp / name).resolve()
                if not target.is_relative_to(tmp.resolve()):
                    raise RuntimeError(f"refusing unsafe path {name!r} in {wheel.name}")
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out)
                count += 1
        (tmp / DONE_MARKER).write_text(f"{wheel.name}\n{count} files\n")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return count


def fetch(version: str, root: Path | None = None) -> Path:
    """Make the sources of ``version`` available; return their directory."""
    root = root or cache_dir()
    dest = src_dir(version, root)
    if (dest / DONE_MARKER).is_file():
        _log(f"{version}: sources already unpacked in {dest}")
        return dest
    root.mkdir(parents=True, exist_ok=True)
    wheel = _download(root, version)
    start = time.monotonic()
    count = _unpack(wheel, dest)
    _log(f"{version}: unpacked {count} .py files into {dest} in {time.monotonic() - start:.1f} s")
    return dest


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("versions", nargs="*", default=list(DEFAULT_VERSIONS))
    parser.add_argument(
        "--print-dir",
        action="store_true",
        help="print the source dir of each version (one per line) and fetch nothing",
    )
    args = parser.parse_args(argv)
    if args.print_dir:
        for v in args.versions:
            print(src_dir(v))
        return 0
    failed = []
    for v in args.versions:
        try:
            print(fetch(v))
        except Exception as exc:  # report every version, then fail
            _log(f"{v}: FAILED: {exc}")
            failed.append(v)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
