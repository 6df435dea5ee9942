"""Training dynamics and the temperature controller: the measures on hand-made responses, the
controllers in a run on the tiny gym (the curve logged, the choice the measure's argmax; a run
killed after the controller ran is resumed in tests/test_e2e.py), unlabeled prompts with both votes and the oracle, TensorBoard through
accelerate's tracker, and `evostar report` on the result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evostar.config import AdaptConfig, ConfigError, load_config
from evostar.data.gym import build_gym
from evostar.data.parse import DataError
from evostar.demo import gym_texts
from evostar.dynamics import CONTROLLER_METRIC, balance_score, candidate_metrics, choose_temperature
from evostar.evolve import LoopState
from evostar.models.tiny import TinyModelSpec, build_tiny_qwen2_vl
from evostar.pipeline import run_experiment
from evostar.pseudo import pseudo_label, pseudo_labelled
from evostar.records import Response, Sample
from evostar.report import write_report
from evostar.tracking import scalars

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- measures
def _r(sid: str, text: str, correct: bool, score: float | None = None) -> Response:
    return Response(sid, text, correct=correct, score=score, extracted=text.split()[-1])


def test_balance_score_is_b_stars():
    responses = [
        _r("a", "x 1", True, 0.9),
        _r("a", "y 1", True, 0.8),
        _r("a", "z 2", False, 0.7),
        _r("a", "w 2", False, 0.1),
        _r("b", "x 3", False, 0.2),
    ]
    # a: 3 above 0.5, 2 distinct correct among them -> min(2/4, 1) * 2/3; b: nothing selected -> 0
    assert balance_score(responses, n_star=4, threshold=0.5) == pytest.approx((0.5 * 2 / 3 + 0.0) / 2)
    # no threshold: all 4 of a selected -> min(2/2, 1) * 2/4; b: 0 correct of 1
    assert balance_score(responses, n_star=2) == pytest.approx((1.0 * 0.5 + 0.0) / 2)
    dupes = [_r("a", "x 1", True), _r("a", "x 1", True)]  # one distinct correct response
    assert balance_score(dupes, n_star=1) == pytest.approx(1 * 1 / 2)


def test_candidate_metrics_and_the_controllers_choice():
    got = candidate_metrics([_r("a", "x 1", True, 0.2), _r("a", "y 2", False, 0.9)], reward_k=1, n_star=1)
    assert got["pass_at_k"] == 1.0 and got["reward_pass_at_k"] == 0.0 and got["accuracy"] == 0.5
    assert candidate_metrics([_r("a", "x 1", True)])["reward_pass_at_k"] is None  # no PRM scores
    curve = {
        0.5: {"reward_pass_at_k": 0.4, "pass_at_k": 0.5, "balance": 0.1},
        0.7: {"reward_pass_at_k": 0.6, "pass_at_k": 0.6, "balance": 0.3},
        1.1: {"reward_pass_at_k": 0.6, "pass_at_k": 0.8, "balance": 0.2},
    }
    assert choose_temperature(curve, "reward_pass", current=1.0) == 1.1  # a tie: the one nearest 1.0
    assert choose_temperature(curve, "reward_pass", current=0.8) == 0.7
    assert choose_temperature(curve, "pass_at_k", current=0.5) == 1.1
    assert choose_temperature(curve, "balance", current=1.1) == 0.7
    assert set(CONTROLLER_METRIC) == {"reward_pass", "pass_at_k", "balance"}


def test_the_grid_and_bad_controller_settings():
    assert AdaptConfig().grid() == [round(0.3 + 0.1 * i, 6) for i in range(14)]
    assert AdaptConfig(t_min=0.6, t_max=1.2, t_step=0.3).grid() == [0.6, 0.9, 1.2]
    with pytest.raises(ConfigError, match="t_max"):
        AdaptConfig(t_min=1.0, t_max=0.5)
    with pytest.raises(ConfigError, match="adapt.controller='reward_pass'.*prm.enabled"):
        load_config(None, ["adapt.controller=reward_pass"])
    with pytest.raises(ConfigError, match="eval.trackers"):
        load_config(None, ["eval.trackers=mlflow"])


def test_pseudo_labels_by_majority_weighted_vote_and_oracle():
    q = Sample("q", "?", answer="7")
    votes = [_r("q", "a 7", True, 0.1), _r("q", "b 3", False, 0.9), _r("q", "c 7", True, 0.2)]
    assert pseudo_label(q, votes) == "7"
    assert pseudo_label(q, votes, weighted=True) == "3"  # 0.9 against 0.1 + 0.2
    assert pseudo_label(q, [Response("q", "no answer here")]) is None
    mc = Sample("m", "?", answer="B", choices=["one", "two", "three"])
    assert pseudo_label(mc, [_r("m", "so (B)", True), _r("m", "so two", True), _r("m", "so A", False)]) in (
        "(B)",
        "two",
    )
    labelled, stats = pseudo_labelled([q, Sample("n", "?", answer="1")], votes, "majority")
    assert [s.answer for s in labelled] == ["7"]  # n has no samples, so no label: dropped
    assert stats == {"unlabeled_prompts": 2, "pseudo_labelled": 1, "pseudo_label_accuracy": 1.0}
    labelled, stats = pseudo_labelled([q], votes, "prm_weighted")
    assert labelled[0].answer == "3" and stats["pseudo_label_accuracy"] == 0.0
    labelled, _ = pseudo_labelled([q], [], "oracle")
    assert labelled[0].answer == "7"


def test_tracker_scalars_flatten_and_drop_what_is_not_a_number():
    rec = {"a": 1, "b": None, "c": "text", "d": {"x": 0.5, "y": float("nan")}, "e": True}
    assert scalars(rec) == {"a": 1.0, "d/x": 0.5, "e": 1.0}


def test_old_loop_states_without_the_unlabeled_cursor_resume(tmp_path):
    saved = {"iteration": 2, "cursor": 10, "temperature": 0.7, "history": []}
    assert LoopState.from_checkpoint(saved, tmp_path / "state.json").unlabeled_cursor == 0


# ----------------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny gym whose seed prompts the warm-up memorises, and an unlabeled copy of them under
    other ids: the votes then have real answers to agree on."""
    root = tmp_path_factory.mktemp("dyn")
    build_gym(root / "data", seed=0, n_seed=8, n_train=8, n_val=3, n_test_id=3, n_test_ood=0)
    build_tiny_qwen2_vl(gym_texts(root / "data"), root / "model", TinyModelSpec(num_layers=1))
    records = json.loads((root / "data" / "seed.json").read_text())
    for rec in records:
        rec["id"] = "u-" + rec["id"]
        rec["conversations"][1]["value"] = rec["conversations"][1]["value"].rsplit("\n\n", 1)[-1]  # answer only
    (root / "data" / "unlabeled.json").write_text(json.dumps(records))
    return root


def _overrides(tiny: Path, out: Path, *extra: str) -> list[str]:
    data = tiny / "data"
    seed = data / "seed.json"
    return [
        f"output_dir={out}",
        f"model.path={tiny / 'model'}",
        f"data.train={seed}",
        f"data.val={seed}",
        f"data.seed_cot={seed}",
        f"data.test={data / 'test_id.json'}",
        "device=cpu",
        "threads=1",
        "progress=false",
        "gen.k=4",
        "gen.max_new_tokens=64",
        "warmup.steps=80",
        "warmup.eval_every=80",
        "warmup.optim.lr=5e-3",
        "warmup.optim.batch_size=8",
        "evolve.iterations=3",
        "evolve.interval=0.5",
        "evolve.steps_per_iteration=1",
        "eval.pass_k=4",
        "eval.pass_prompts=4",
        *extra,
    ]


PRM_ON = [
    "prm.enabled=true",
    "evolve.selection=top_k",
    "prm.collect_prompts=4",
    "prm.collect_k=4",
    "prm.n_completions=2",
    "prm.max_new_tokens=6",
    "prm.steps=2",
    "prm.optim.batch_size=4",
]
ADAPT = ["adapt.controller=reward_pass", "adapt.every=2", "adapt.t_min=0.4", "adapt.t_max=1.6", "adapt.t_step=0.6"]


@pytest.fixture(scope="module")
def adaptive(tiny) -> tuple[Path, dict, list[str]]:
    out = tiny / "run_adapt"
    overrides = _overrides(tiny, out, *PRM_ON, *ADAPT, "eval.trackers=tensorboard")
    return out, run_experiment(load_config(None, overrides)), overrides


def test_the_controller_runs_every_two_iterations_and_picks_the_argmax(adaptive):
    out, summary, _ = adaptive
    its = summary["iterations"]
    assert [r["adapted"] for r in its] == [True, False, True]
    for r in its:
        assert {"val_accuracy", "val_pass_at_k", "val_greedy_on_pass_prompts", "val_pass_minus_greedy"} <= set(r)
        # both on the same eval.pass_prompts=4 prompts (at T=1.0 Pass@K may still read below greedy)
        assert r["val_greedy_on_pass_prompts"] * 4 == round(r["val_greedy_on_pass_prompts"] * 4)
        assert r["val_pass_minus_greedy"] == r["val_pass_at_k"] - r["val_greedy_on_pass_prompts"]
        assert {"correct", "kept", "distinct_share", "mean_steps", "kept_steps_all_correct", "temperature"} <= set(r)
    for r in (its[0], its[2]):
        curve = r["temperature_curve"]
        assert set(curve) == {"0.4", "1", "1.6"}
        best = max(m["reward_pass_at_k"] for m in curve.values())
        assert curve[f"{r['temperature']:g}"]["reward_pass_at_k"] == best
    assert its[1]["temperature"] == its[0]["temperature"]  # kept between controller runs
    assert summary["temperatures"] == [r["temperature"] for r in its]
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in logged if m["stage"] == "adapt"] == [1, 3]


def test_tensorboard_events_hold_the_iteration_scalars(adaptive):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, summary, _ = adaptive
    (run_dir,) = [p for p in (out / "tracking").iterdir() if p.is_dir()]
    events = EventAccumulator(str(run_dir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"val_accuracy", "val_pass_at_k", "temperature", "kept", "temperature_curve/1/reward_pass_at_k"} <= tags
    steps = [e.step for e in events.Scalars("val_accuracy")]
    assert sorted(set(steps)) == [1, 2, 3]
    by_step = {e.step: e.value for e in events.Scalars("val_accuracy")}
    assert by_step[3] == pytest.approx(summary["iterations"][2]["val_accuracy"])


def test_report_writes_the_plots_and_a_page(adaptive):
    out, _, _ = adaptive
    page = write_report(out)
    text = page.read_text()
    for name in ("accuracy.png", "temperature_curves.png", "temperature.png", "kept.png"):
        assert (page.parent / name).stat().st_size > 1000 and f"({name})" in text
    assert "Temperatures chosen" in text


@pytest.mark.parametrize("mode", ["majority", "prm_weighted", "oracle"])
def test_unlabeled_prompts_end_to_end(tiny, mode):
    out = tiny / f"run_unlabeled_{mode}"
    unlabeled = tiny / "data" / "unlabeled.json"
    extra = [f"data.unlabeled={unlabeled}", f"evolve.pseudo_label={mode}", "evolve.unlabeled_from=0.5"]
    summary = run_experiment(load_config(None, _overrides(tiny, out, *PRM_ON, *extra)))
    its = summary["iterations"]
    assert "unlabeled_prompts" not in its[0] and "unlabeled_prompts" not in its[1]  # from 0.5 of 3 iterations on
    last = its[2]
    assert last["unlabeled_prompts"] == 4  # half of the pool's 8
    assert 0 < last["pseudo_labelled"] <= 4 and 0.0 <= last["pseudo_label_accuracy"] <= 1.0
    if mode == "oracle":
        assert last["pseudo_label_accuracy"] == 1.0 and last["pseudo_labelled"] == 4
    assert last["kept"] >= last["unlabeled_kept"]
    samples = [json.loads(line) for line in (out / "samples" / "iter_003.jsonl").read_text().splitlines()]
    assert any(s["sample_id"].startswith("u-") for s in samples)


def test_unlabeled_pools_that_cannot_work_are_refused(tiny, tmp_path):
    seed = tiny / "data" / "seed.json"
    with pytest.raises(DataError, match="also ids of data.train"):
        run_experiment(load_config(None, _overrides(tiny, tmp_path / "a", f"data.unlabeled={seed}")))
    records = json.loads((tiny / "data" / "unlabeled.json").read_text())
    records[1]["conversations"] = records[1]["conversations"][:1]  # no answer
    bad = tiny / "data" / "unlabeled_no_answer.json"  # beside the images it names
    bad.write_text(json.dumps(records))
    with pytest.raises(DataError, match="'answer' is missing.*oracle"):
        run_experiment(
            load_config(None, _overrides(tiny, tmp_path / "b", f"data.unlabeled={bad}", "evolve.pseudo_label=oracle"))
        )


def test_a_fork_reuses_warmup_and_prm_and_runs_only_the_loop(adaptive, tmp_path):
    from typer.testing import CliRunner

    from evostar.cli import app

    out, summary, _ = adaptive
    dst = tmp_path / "static_all"
    result = CliRunner().invoke(app, ["fork", str(out), str(dst), "adapt.controller=static", "evolve.selection=all"])
    assert result.exit_code == 0, result.output
    forked = json.loads((dst / "summary.json").read_text())
    assert forked["accuracy"]["warmup"] == summary["accuracy"]["warmup"]
    assert forked["prm"]["step_auroc_val"] == summary["prm"]["step_auroc_val"]
    assert forked["temperatures"] == [1.0, 1.0, 1.0] and not any(r["adapted"] for r in forked["iterations"])
    for name in ("model.safetensors",):
        assert (dst / "checkpoints" / "prm" / name).read_bytes() == (out / "checkpoints" / "prm" / name).read_bytes()
    stages = [json.loads(line)["stage"] for line in (dst / "metrics.jsonl").read_text().splitlines()]
    assert stages.count("warmup") == 1 and stages.count("prm_train") == 1 and "iter_3" in stages
    # all-correct selection reads no PRM score: the training samples go unscored, and scoring them
    # anyway (prm.score_unused) changes nothing the loop does
    samples = [json.loads(line) for line in (dst / "samples" / "iter_001.jsonl").read_text().splitlines()]
    assert samples and all(s["score"] is None for s in samples)
    assert not any("prm_score_seconds" in r for r in forked["iterations"])
    assert all(r["val_reward_pass_at_k"] is not None for r in forked["iterations"])
    scored_dst = tmp_path / "static_all_scored"
    over = ["adapt.controller=static", "evolve.selection=all", "prm.score_unused=true"]
    result = CliRunner().invoke(app, ["fork", str(out), str(scored_dst), *over])
    assert result.exit_code == 0, result.output
    scored = json.loads((scored_dst / "summary.json").read_text())
    assert all(r["prm_score_seconds"] >= 0 for r in scored["iterations"])
    again = [json.loads(line) for line in (scored_dst / "samples" / "iter_001.jsonl").read_text().splitlines()]
    assert all(s["score"] is not None for s in again if s["text"])
    assert [s["text"] for s in again] == [s["text"] for s in samples]
    assert scored["accuracy"]["final"] == forked["accuracy"]["final"]
    assert [r["kept"] for r in scored["iterations"]] == [r["kept"] for r in forked["iterations"]]
    refused = CliRunner().invoke(app, ["fork", str(out), str(tmp_path / "x"), "warmup.steps=3"])
    assert refused.exit_code != 0 and "warmup.steps" in refused.output and "Traceback" not in refused.output
    assert not (tmp_path / "x").exists()
