"""Builds a vLLM package tree that is the installed one with some files replaced.

Used to run code against another release's pure-Python modules (those we
cannot install here: vLLM 0.33.0 needs a torch with no CPU build). The tree
is made of symlinks: every directory on the way to a replaced file is a real
directory, everything else links to the installed package (so its compiled
extensions load as usual). Put the tree's parent first on ``PYTHONPATH`` in a
*separate* process: the installed ``vllm`` must not have been imported there.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path


def build_overlay(
    installed_pkg: Path, upstream_pkg: Path, rel_dirs: Iterable[str], dest_root: Path
) -> list[str]:
    """Create ``dest_root/vllm``: ``installed_pkg`` with ``rel_dirs`` from ``upstream_pkg``.

    ``rel_dirs`` are directories relative to the package (e.g. ``v1/core``);
    every ``.py`` file under them comes from ``upstream_pkg`` (new modules
    included) and installed files that upstream no longer has are dropped.
    Returns the replaced/added files, relative to the package.
    """
    dest = dest_root / "vllm"
    if dest.exists():
        shutil.rmtree(dest)
    replaced: list[str] = []
    overlay = [Path(d) for d in rel_dirs]

    def on_overlay_path(rel: Path) -> bool:
        # True for a directory that is an overlay dir, inside one, or above one.
        return any(rel == o or o in rel.parents or rel in o.parents for o in overlay)

    def inside_overlay(rel: Path) -> bool:
        return any(rel == o or o in rel.parents for o in overlay)

    def walk(rel: Path) -> None:
        src_dir = installed_pkg / rel
        out_dir = dest / rel
        out_dir.mkdir(parents=True, exist_ok=True)
        if inside_overlay(rel):
            up_dir = upstream_pkg / rel
            for entry in sorted(up_dir.iterdir()) if up_dir.is_dir() else []:
                if entry.is_dir():
                    if entry.name != "__pycache__":
                        walk(rel / entry.name)
                elif entry.suffix == ".py":
                    shutil.copy2(entry, out_dir / entry.name)
                    replaced.append(str(rel / entry.name))
            # Non-Python files of the installed dir (none expected) still link.
            for entry in sorted(src_dir.iterdir()) if src_dir.is_dir() else []:
                target = out_dir / entry.name
                if entry.name == "__pycache__" or target.exists():
                    continue
                if entry.is_file() and entry.suffix != ".py":
                    os.symlink(entry, target)
            return
        for entry in sorted(src_dir.iterdir()):
            if entry.name == "__pycache__":
                continue
            child = rel / entry.name
            if entry.is_dir() and on_overlay_path(child):
                walk(child)
            else:
                os.symlink(entry, out_dir / entry.name)

    walk(Path("."))
    return sorted(replaced)
