"""Smoke test of the benchmarks: each script's `--quick` run ends with positive numbers.

`--quick` sizes are a few seconds of work, not a measurement. `--threads 1` keeps the run fast
when other jobs share the CPU (two torch threads on a busy 2-core machine wait on each other).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_quick(script: str, tmp_path: Path) -> dict[str, Any]:
    out = tmp_path / "result.json"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / script),
        "--quick",
        "--threads",
        "1",
        "--workdir",
        str(tmp_path / "work"),
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "evostar" in proc.stdout
    return json.loads(out.read_text())


def assert_positive(metrics: dict[str, Any], keys: list[str]) -> None:
    for key in keys:
        assert metrics[key] > 0, (key, metrics)


def test_bench_rollout_quick(tmp_path: Path) -> None:
    result = run_quick("bench_rollout.py", tmp_path)
    cfg = result["config"]
    for backend in ("evostar", "evostar-pool", "transformers"):
        assert_positive(result[backend], ["seq_per_s", "tokens_per_s", "seconds"])
        assert result[backend]["sequences"] == cfg["prompts"] * cfg["k"]
        assert 0.0 <= result[backend]["answer_marker_frac"] <= 1.0
    for backend in ("evostar", "evostar-pool"):
        assert_positive(result["ratio"][backend], ["seq_per_s", "tokens_per_s"])
    assert result["warm_model"]["steps"] == cfg["warm_steps"] > 0


def test_bench_sft_quick(tmp_path: Path) -> None:
    result = run_quick("bench_sft.py", tmp_path)
    keys = ["loss_tokens_per_s", "total_tokens_per_s", "steps_per_s"]
    assert_positive(result["evostar"], keys)
    if importlib.util.find_spec("trl") is None:  # TRL is the optional `bench` extra
        assert "trl_error" in result
        return
    assert "trl_error" not in result, result.get("trl_error")
    assert_positive(result["trl"], keys)
    assert_positive(result["ratio"], keys)
    check = result["initial_loss"]
    assert check["comparable"], check
    assert check["evostar"]["loss_tokens"] > 0 and check["trl"]["loss_tokens"] > 0
