"""Smoke test of ``python -m vllm_aibrix.bench e2e``: the whole entry point, tiniest sizes.

Two configurations (vLLM alone and our L1) on the long-document workload with
the tiny test model: two documents of ~650 tokens against an engine KV space
of 10 blocks (1,280 tokens, less than the two documents), so the query round
finds part of each document evicted from vLLM's prefix cache and L1 serves
it. Most of the time is the two server starts.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.harness import REPO, tiny_model

pytestmark = pytest.mark.e2e


def test_e2e_longdoc_vllm_and_l1(tmp_path: Path) -> None:
    out = tmp_path / "e2e"
    cmd = [
        sys.executable,
        "-m",
        "vllm_aibrix.bench",
        "e2e",
        "--workload",
        "longdoc",
        "--configs",
        "vllm,l1",
        "--model",
        tiny_model(),
        "--max-model-len",
        "1024",
        "--engine-blocks",
        "10",  # 1,280 tokens (vLLM keeps one block back, so 8 cannot serve 1,024)
        "--docs",
        "2",
        "--doc-tokens-min",
        "600",
        "--doc-tokens-max",
        "700",
        "--rounds",
        "1",
        "--max-tokens",
        "4",
        "--json",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout)
    assert summary == json.loads((out / "summary.json").read_text()) | {"files": summary["files"]}
    assert summary["failed"] == {}
    rows = summary["summary"]
    assert set(rows) == {"vllm", "l1"}
    for name, row in rows.items():
        assert row["failed"] == 0, name
        for key in ("mean", "p50", "p99"):
            assert row["ttft_ms"][key] > 0, (name, key)
        assert row["itl_ms"]["p50"] is not None
        assert row["request_throughput"] > 0 and row["total_token_throughput"] > 0
        assert set(row["hit_ratio"]) == {"vllm", "l1", "l2", "total"}
        assert set(row["bytes"]) == {"engine_to_l1", "l1_to_engine", "l1_to_l2", "l2_to_l1"}
        assert "floor_ttft_ms" in row
        # Equal CPU binding, recorded from each server's log.
        assert row["core_ids"] == rows["vllm"]["core_ids"] is not None
    assert summary["conditions"]["cpu_binding"]["VLLM_CPU_NUM_OF_RESERVED_CPU"] == 1
    assert rows["vllm"]["hit_ratio"]["l1"] == 0.0
    assert rows["l1"]["hit_ratio"]["l1"] > 0.0, rows["l1"]
    assert rows["l1"]["bytes"]["l1_to_engine"] > 0
    assert "l1" in summary["vs_vllm"]
    per_config = json.loads(Path(summary["files"]["l1"]).read_text())
    assert per_config["phases"]["query"]["records"]
    assert per_config["connector_extra_config"] == {}
    for png in summary["plots"]:
        assert Path(png).stat().st_size > 0
    assert "TTFT mean" in proc.stderr  # the summary table
