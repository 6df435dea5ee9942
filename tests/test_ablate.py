"""`evostar ablate`: rows, the findings' rule, the table, resume after SIGKILL, recipes, bad input.

The smoke preset runs a few real rows (a shared warm-up and PRM per seed, forks of it, SFT at equal
compute) in seconds; its accuracies are zero, so the findings' rule is checked on a hand-made table
whose verdicts are known, and on the real table by recomputing them from its rows.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from evostar.ablate import (
    ABLATE_PRESETS,
    ROW_NAMES,
    findings,
    paired,
    recipe_configs,
    run_ablation,
    write_ablation_report,
)
from evostar.config import ConfigError, flatten, load_config, to_dict
from evostar.errors import RunDirError

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
ROOT = Path(__file__).resolve().parents[1]
LOOP_ROWS = "base,warmup,continuous_25,prm_top2,prm_top4"
# the reference run: three loop rows beside the full recipe (side by side in two processes), SFT
FIXTURE_ROWS = f"{LOOP_ROWS},random2,sft_equal_compute"


def cmd(out: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "evostar.cli", "ablate", "--preset", "smoke", "--out", str(out), *flags]


@pytest.fixture(scope="module")
def ablation(tmp_path_factory) -> Path:
    """Two seeds of a few rows, uninterrupted: the reference of the killed one."""
    out = tmp_path_factory.mktemp("ablate") / "full"
    # the CLI, as the killed run below: in-process runs would inherit the tests' one torch thread
    proc = subprocess.run(
        cmd(out, "--seeds", "2", "--rows", FIXTURE_ROWS, "--jobs", "2"),
        env=ENV,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (out.parent / "stderr.txt").write_text(proc.stderr)  # the CLI says its progress on stderr
    return out


def test_table_has_every_field_and_its_findings_recompute_from_its_rows(ablation):
    table = json.loads((ablation / "table.json").read_text())
    names = [r["name"] for r in table["rows"]]
    assert names == [n for n in ROW_NAMES if n in FIXTURE_ROWS.split(",")]
    fields = {"name", "test_id_mean", "test_id_std", "test_ood_mean", "test_ood_std", "seeds", "wall_seconds_mean"}
    for row in table["rows"]:
        assert fields | {"paper_id", "paper_ood"} <= set(row)
        assert row["seeds"] == 2 and set(row["per_seed"]) == {"0", "1"}
    assert findings(table) == table["findings"]
    assert {f["id"] for f in table["findings"]} >= {"F1a", "F1b", "F2a", "F2b", "F3a", "F3b", "F4", "F5a", "F6a"}
    by_id = {f["id"]: f for f in table["findings"]}
    assert by_id["F1a"]["reproduced"] is None  # its rows were not run
    assert by_id["F2a"]["reproduced"] is not None  # prm_top2 and continuous_25 were
    # top-4 of K=4 samples keeps every correct response: the all-correct row's run, said so
    top4 = next(r for r in table["rows"] if r["name"] == "prm_top4")
    assert top4["per_seed"]["0"]["same_as"] == "continuous_25" and "continuous_25" in top4["note"]
    assert not (ablation / "seed0" / "prm_top4").exists()
    # the SFT row trained from the warm-up for the full recipe's post-warm-up seconds, wd from the grid
    sft = next(r for r in table["rows"] if r["name"] == "sft_equal_compute")
    assert table["grids"]["sft_weight_decay"]["searched_on_seed"] == 0
    assert sft["per_seed"]["0"]["weight_decay"] == sft["per_seed"]["1"]["weight_decay"]
    share = ABLATE_PRESETS["smoke"]["peer_budget_share"]
    for seed in ("0", "1"):  # as many steps as the warm-up's rate fits in the recipe's seconds, times the share
        shared, mstar = (
            json.loads((ablation / f"seed{seed}" / d / "summary.json").read_text()) for d in ("shared", "mstar")
        )
        shared_cfg = yaml.safe_load((ablation / f"seed{seed}" / "shared" / "config.yaml").read_text())
        seconds = shared["stage_seconds"]
        budget = share * (sum(v for k, v in seconds.items() if k.startswith("prm_")) + mstar["stage_seconds"]["evolve"])
        assert sft["per_seed"][seed]["steps"] == max(
            1, round(shared_cfg["warmup"]["steps"] / seconds["warmup"] * budget)
        )
    md = (ablation / "table.md").read_text()
    assert "| prm_top2 |" in md and "45.3" in md and "Rule:" in md
    assert (ablation / "table.png").stat().st_size > 0
    page = write_ablation_report(ablation)
    assert (page.parent / "table.png").exists()


def test_loop_rows_are_forks_of_one_shared_run_per_seed(ablation):
    for seed in (0, 1):
        shared = ablation / f"seed{seed}" / "shared"
        cfg = yaml.safe_load((ablation / f"seed{seed}" / "prm_top2" / "config.yaml").read_text())
        assert cfg["evolve"]["selection"] == "top_k" and cfg["evolve"]["iterations"] == 4
        progress = json.loads((ablation / f"seed{seed}" / "prm_top2" / "progress.json").read_text())
        assert progress["forked_from"] == str(shared)
        assert yaml.safe_load((shared / "config.yaml").read_text())["evolve"]["iterations"] == 0


def test_sigkill_mid_row_then_resume_ends_with_the_same_table(ablation, tmp_path):
    out = tmp_path / "killed"
    row = out / "seed0" / "prm_top2"
    child = subprocess.Popen(
        cmd(out, "--seeds", "1", "--rows", LOOP_ROWS), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while time.time() < deadline and child.poll() is None:
        progress = row / "progress.json"
        if progress.exists() and "iter_1" in progress.read_text():
            child.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL, "the ablation finished before it could be killed"
    assert not (row / "summary.json").exists()
    proc = subprocess.run(
        cmd(out, "--seeds", "1", "--rows", LOOP_ROWS, "--resume"), env=ENV, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| prm_top2 |" in proc.stdout and "## Findings" in proc.stdout

    def accuracies(path: Path) -> dict:
        t = json.loads((path / "table.json").read_text())
        keep = set(LOOP_ROWS.split(","))
        return {
            r["name"]: {s: (v["test_id"], v["test_ood"]) for s, v in r["per_seed"].items() if s == "0"}
            for r in t["rows"]
            if r["name"] in keep
        }

    assert accuracies(out) == accuracies(ablation)
    # the resumed row sampled, selected and trained exactly as the uninterrupted one did
    # (tests/test_e2e.py checks the weights of a resumed loop bit for bit)
    ref = json.loads((ablation / "seed0" / "prm_top2" / "summary.json").read_text())
    got = json.loads((row / "summary.json").read_text())

    def iterations(summary: dict) -> list[dict]:
        return [{k: v for k, v in it.items() if not k.endswith("seconds")} for it in summary["iterations"]]

    assert iterations(got) == iterations(ref)


def test_rows_side_by_side_run_one_thread_each_and_the_full_recipe_alone(ablation):
    # prm_top4 is continuous_25's run (top-4 of K=4): three loop rows to run besides mstar
    said = (ablation.parent / "stderr.txt").read_text()
    # the SFT runs (a step budget) beside them: both weight decays of the grid on seed 0, the chosen one on seed 1
    assert said.count("seed 0: 3 loop rows and 2 SFT runs in 2 processes side by side") == 1
    assert said.count("seed 1: 3 loop rows and 1 SFT runs in 2 processes side by side") == 1
    chosen = json.loads((ablation / "table.json").read_text())["grids"]["sft_weight_decay"]["chosen"]
    for seed, decays in ((0, (0.0, 0.1)), (1, (chosen,))):
        for wd in decays:
            sft = yaml.safe_load((ablation / f"seed{seed}" / f"sft_wd{wd:g}" / "config.yaml").read_text())
            assert sft["threads"] == 1 and sft["warmup"]["optim"]["weight_decay"] == wd
    for seed in (0, 1):
        for name in ("continuous_25", "prm_top2", "random2"):
            cfg = yaml.safe_load((ablation / f"seed{seed}" / name / "config.yaml").read_text())
            assert cfg["threads"] == 1 and cfg["gen"]["workers"] == 1, name
            assert (ablation / f"seed{seed}" / name / "summary.json").exists()
        # the full recipe ran alone, with the shared run's settings: its seconds are the SFT row's budget
        shared = yaml.safe_load((ablation / f"seed{seed}" / "shared" / "config.yaml").read_text())
        mstar = yaml.safe_load((ablation / f"seed{seed}" / "mstar" / "config.yaml").read_text())
        assert (mstar["threads"], mstar["gen"]["workers"]) == (shared["threads"], shared["gen"]["workers"])


def test_findings_follow_the_rule_on_a_known_table():
    def row(name: str, ids: list[float], oods: list[float] | None = None) -> dict:
        oods = oods or ids
        return {
            "name": name,
            "per_seed": {str(s): {"test_id": a, "test_ood": b} for s, (a, b) in enumerate(zip(ids, oods, strict=True))},
        }

    table = {
        "rows": [
            row("continuous_25", [50, 52, 51]),
            row("iterative_rft", [45, 46, 44]),  # clearly below: counts
            row("rest_em", [49, 53, 50]),  # +0.3 ± noise: does not count
            row("prm_top2", [50, 52, 51], [30, 31, 32]),
            row("mstar", [40, 42, 41]),  # clearly below prm_top2: F5a contradicted
            row("unlabeled_oracle", [50, 52, 51], [35, 36, 37]),  # +5 OOD, 0 ID
        ],
        "measures": {},
    }
    by_id = {f["id"]: f for f in findings(table)}
    assert by_id["F1a"]["reproduced"] is False and by_id["F1a"]["verdict"] == "not reproduced"
    assert "continuous_25 − iterative_rft (test_id): +6.0" in by_id["F1a"]["evidence"]
    assert by_id["F5a"]["reproduced"] is False
    assert by_id["F6b"]["reproduced"] is True
    assert by_id["F2b"]["reproduced"] is None  # random2 was not run
    table["rows"][2] = row("rest_em", [44, 45, 46])
    assert {f["id"]: f for f in findings(table)}["F1a"]["reproduced"] is True
    one_seed = {"rows": [row("continuous_25", [60]), row("iterative_rft", [40]), row("rest_em", [40])]}
    f1a = {f["id"]: f for f in findings(one_seed)}["F1a"]
    assert f1a["reproduced"] is False and f1a["verdict"].startswith("not distinguishable")
    one_seed["rows"].append(row("unlabeled_prm_0", [30]))
    one_seed["rows"].append(row("unlabeled_prm_75", [30]))
    one_seed["rows"].append(row("prm_top2", [60]))
    f6a = {f["id"]: f for f in findings(one_seed)}["F6a"]  # 'does not beat' is not shown by one seed either
    assert f6a["reproduced"] is False and f6a["verdict"].startswith("not distinguishable")
    d = paired({"0": 3.0, "1": 5.0}, {"0": 1.0, "1": 1.0})
    assert d.mean == 3.0 and d.n == 2 and d.counts()


def test_recipes_in_the_repo_are_the_ablation_rows():
    folder = ROOT / "recipes" / "gym"
    expected = recipe_configs("default")
    assert sorted(p.stem for p in folder.glob("*.yaml")) == sorted(expected)
    for name, data in expected.items():
        loaded = load_config(folder / f"{name}.yaml")
        assert flatten(to_dict(loaded)) == flatten(data), f"recipes/gym/{name}.yaml is stale: regenerate it"
    assert load_config(folder / "mstar.yaml").adapt.controller == "reward_pass"
    assert load_config(folder / "continuous_12.5.yaml").evolve.iterations == 8


def test_bad_input_is_refused_with_a_clear_message(ablation, tmp_path):
    with pytest.raises(ConfigError, match="not rows"):
        run_ablation("smoke", tmp_path / "a", rows=["prm_top3"])
    with pytest.raises(ConfigError, match="--preset"):
        run_ablation("huge", tmp_path / "b")
    with pytest.raises(ConfigError, match="--jobs"):
        run_ablation("smoke", tmp_path / "b", jobs=0)
    with pytest.raises(RunDirError, match="--resume"):
        run_ablation("smoke", ablation, rows=["base"])
    with pytest.raises(RunDirError, match="--preset smoke"):
        run_ablation("quick", ablation, rows=["base"], resume=True)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x").write_text("")
    with pytest.raises(RunDirError, match="not an ablation"):
        run_ablation("smoke", tmp_path / "c", resume=True)
    proc = subprocess.run(cmd(tmp_path / "d", "--rows", "nope"), env=ENV, capture_output=True, text=True)
    assert proc.returncode == 2 and "not rows" in proc.stderr and "Traceback" not in proc.stderr
