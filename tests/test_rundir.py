import json
import math

import pytest
import torch

from evostar.errors import RunDirError
from evostar.rundir import RunDir, atomic_write_json, dumps, stage_seed, write_jsonl


def test_atomic_write_leaves_no_temp_files(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    atomic_write_json(tmp_path / "a.json", {"x": 2})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_progress_and_metrics_truncation_on_resume(tmp_path):
    run = RunDir(tmp_path / "run")
    run.log("base", acc=0.1)
    run.finish("base", {"acc": 0.1})
    run.log("iter_1", acc=0.2)  # iteration killed before finish
    with open(run.root / "metrics.jsonl", "a") as f:
        f.write('{"stage": "iter_1", "acc"')  # a line cut by the kill

    with pytest.raises(RunDirError, match="--resume"):
        RunDir(tmp_path / "run")
    resumed = RunDir(tmp_path / "run", resume=True)
    assert resumed.done("base") and not resumed.done("iter_1")
    assert resumed.result("base") == {"acc": 0.1}
    assert [m["stage"] for m in resumed.metrics()] == ["base"]


def test_stage_seed_is_stable_and_distinct():
    assert stage_seed(0, "generate", 1) == stage_seed(0, "generate", 1)
    assert len({stage_seed(0, "generate", i) for i in range(50)}) == 50
    assert stage_seed(0, "x") != stage_seed(1, "x")


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_resume_with_nothing_to_resume_says_so(tmp_path, make):
    root = tmp_path / "run"
    if make == "empty":
        root.mkdir()
    with pytest.raises(RunDirError, match="nothing to resume"):
        RunDir(root, resume=True)


def test_bad_run_directories_are_named(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirError, match="file: the run directory is a file"):
        RunDir(tmp_path / "file")
    run = RunDir(tmp_path / "run")
    run.finish("base", {})
    (run.root / "progress.json").write_text('{"completed": ["ba')  # truncated
    with pytest.raises(RunDirError, match="progress.json"):
        RunDir(run.root, resume=True)


def _refuse_constant(name: str):
    raise AssertionError(f"non-strict JSON constant {name}")


def test_json_is_strict_everywhere(tmp_path):
    nan, inf = float("nan"), math.inf
    row = {"loss": nan, "x": [inf, 1.0], "t": torch.tensor(2.5), "n": {"y": -inf}}
    assert json.loads(dumps(row)) == {"loss": None, "x": [None, 1.0], "t": 2.5, "n": {"y": None}}
    run = RunDir(tmp_path / "run")
    run.log("iter_1", sft_loss=nan)
    run.finish("iter_1", {"sft_loss": nan})
    atomic_write_json(tmp_path / "s.json", {"a": nan})
    write_jsonl(tmp_path / "r.jsonl", [{"a": nan}])
    for path in (run.root / "metrics.jsonl", run.root / "progress.json", tmp_path / "s.json", tmp_path / "r.jsonl"):
        text = path.read_text()
        assert "NaN" not in text and "Infinity" not in text
        for line in text.splitlines() if path.suffix == ".jsonl" else [text]:
            json.loads(line, parse_constant=_refuse_constant)
