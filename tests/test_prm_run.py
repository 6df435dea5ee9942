"""The PRM in a run: its config section, the stages after warm-up (collect -> label -> train ->
eval) on the tiny gym and a tiny Qwen2-VL, PRM top-2 selection and Reward-Pass@2 in the loop,
the summary's `prm` object, and resuming runs saved before the section existed."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from evostar.cli import app
from evostar.config import Config, ConfigError, build_config, dump_yaml, load_config
from evostar.context import check_same_run, prompt_encoder
from evostar.data.gym import build_gym
from evostar.data.parse import DataError
from evostar.demo import gym_texts
from evostar.errors import RunDirError
from evostar.models.tiny import TinyModelSpec, build_tiny_qwen2_vl
from evostar.pipeline import check_fit, load_data, run_experiment
from evostar.prm_stages import PRM_STAGES, process_measures
from evostar.records import Response

pytestmark = pytest.mark.usefixtures("one_thread")

# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("selection", ["top_k", "threshold"])
def test_scored_selection_needs_the_prm(selection):
    with pytest.raises(ConfigError, match=r"evolve.selection=.*prm.enabled is false.*prm.enabled=true"):
        build_config({"evolve": {"selection": selection}})
    cfg = build_config({"evolve": {"selection": selection}, "prm": {"enabled": True}})
    assert cfg.evolve.selection == selection and cfg.prm.enabled


def test_prm_section_defaults_off_and_refuses_what_cannot_work():
    assert Config().prm.enabled is False and "prm" in yaml.safe_load(dump_yaml(Config()))
    with pytest.raises(ConfigError, match=r"prm.collect_k=9: more than gen.batch_size=8"):
        build_config(
            {"gen": {"batch_size": 8, "k": 2}, "eval": {"pass_k": 2}, "prm": {"enabled": True, "collect_k": 9}}
        )
    with pytest.raises(ConfigError, match=r"prm.init='policy'.*adapters"):
        build_config({"model": {"lora_r": 4}, "prm": {"enabled": True}})
    with pytest.raises(ConfigError, match=r"prm.reward_pass_k=0: must be >= 1"):
        load_config(None, ["prm.reward_pass_k=0"])


def _saved_run(root: Path, cfg: Config, drop: str) -> None:
    """A run directory as an older evostar left it: config.yaml without section `drop`."""
    root.mkdir(parents=True)
    saved = yaml.safe_load(dump_yaml(cfg))
    del saved[drop]
    (root / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    (root / "progress.json").write_text('{"completed": ["base"], "results": {"base": {}}}')


def test_a_saved_config_without_the_prm_section_resumes_as_prm_off(tmp_path):
    cfg = build_config({"output_dir": str(tmp_path / "run")})
    _saved_run(tmp_path / "run", cfg, "prm")
    check_same_run(tmp_path / "run", cfg)  # the defaults: what that run did
    on = build_config({"output_dir": str(tmp_path / "run"), "prm": {"enabled": True}})
    with pytest.raises(RunDirError, match=r"prm.enabled: False -> True"):
        check_same_run(tmp_path / "run", on)
    _saved_run(tmp_path / "other", cfg, "eval")  # any other missing section: a damaged file
    with pytest.raises(RunDirError, match="keys missing"):
        check_same_run(tmp_path / "other", cfg)


def test_labelling_room_is_checked_before_any_compute(tiny):
    """A labelling completion continues a whole response: the train prompts need room for both."""
    cfg = load_config(None, _overrides(tiny, tiny / "unused", *PRM_ON))
    data = load_data(cfg)
    data.val, data.seed_cot, data.tests = data.train, [], {}  # the train prompts alone
    io = prompt_encoder(cfg)
    longest = max(io.prompt_length(s) + len(io.turn_end_ids) for s in data.train)
    context = longest + cfg.gen.max_new_tokens
    check_fit(io, context, load_config(None, _overrides(tiny, tiny / "unused")), data)  # the PRM off: fits
    with pytest.raises(DataError, match=r"gen.max_new_tokens=16 \+ prm.max_new_tokens=6"):
        check_fit(io, context, cfg, data)


def test_process_measures_on_hand_scored_responses():
    def r(sid: str, steps: list[bool], scores: list[float], correct: bool = True) -> Response:
        return Response(sid, "x", correct=correct, steps_correct=steps, step_scores=scores, score=min(scores))

    responses = [
        r("a", [True, True], [0.9, 0.8]),
        r("a", [True, False], [0.9, 0.2]),
        r("a", [False, False], [0.3, 0.1]),
        r("b", [True], [0.7]),
        r("b", [False], [0.4], correct=False),
    ]
    m = process_measures(responses, seed=0)
    assert m["step_truth"] == "known" and m["step_auroc_val"] == 1.0
    assert m["invalid_rate_all"] == pytest.approx(2 / 4)  # correct ones: a's three and b's first
    assert m["invalid_rate_top2"] == pytest.approx(1 / 3)  # a: the two best, b: its one correct
    assert m["first_error_f1_val"] == 1.0 and m["correct_with_truth"] == 4
    assert process_measures([Response("c", "x", correct=True)])["step_truth"] == "unknown"


# ----------------------------------------------------------------------------- the run


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prm_run")
    build_gym(root / "data", seed=0, n_seed=8, n_train=8, n_val=3, n_test_id=3, n_test_ood=0)
    build_tiny_qwen2_vl(gym_texts(root / "data"), root / "model", TinyModelSpec(num_layers=1))
    return root


def _overrides(tiny: Path, out: Path, *extra: str) -> list[str]:
    data = tiny / "data"
    return [
        f"output_dir={out}",
        f"model.path={tiny / 'model'}",
        f"data.train={data / 'train.json'}",
        f"data.val={data / 'val.json'}",
        f"data.seed_cot={data / 'seed.json'}",
        f"data.test={data / 'test_id.json'}",
        "device=cpu",
        "threads=1",
        "progress=false",
        "gen.k=2",
        "gen.max_new_tokens=16",
        "warmup.steps=2",
        "warmup.eval_every=2",
        "evolve.iterations=1",
        "evolve.interval=0.5",
        "evolve.steps_per_iteration=1",
        "eval.pass_k=2",
        *extra,
    ]


PRM_ON = [
    "prm.enabled=true",
    "evolve.selection=top_k",
    "evolve.select_k=2",
    "prm.collect_prompts=3",
    "prm.collect_k=2",
    "prm.n_completions=2",
    "prm.max_new_tokens=6",
    "prm.chunk_size=4",
    "prm.steps=2",
    "prm.optim.batch_size=4",
    "prm.reward_pass_k=2",
]


@pytest.fixture(scope="module")
def prm_run(tiny) -> tuple[Path, dict, list[str]]:
    """A run whose loop and PRM work on the seed prompts, which the warm-up half memorises: its
    samples there mix right and wrong answers and steps, so there is something to rank."""
    out, seed = tiny / "run_prm", tiny / "data" / "seed.json"
    memorise = ["warmup.steps=80", "warmup.eval_every=80", "warmup.optim.lr=5e-3", "warmup.optim.batch_size=8"]
    sizes = ["gen.max_new_tokens=64", "gen.k=4", "eval.pass_k=4", "prm.collect_prompts=4", "prm.collect_k=4"]
    overrides = _overrides(tiny, out, *PRM_ON, f"data.train={seed}", f"data.val={seed}", *memorise, *sizes)
    return out, run_experiment(load_config(None, overrides)), overrides


def test_prm_stages_run_after_warmup_and_are_recorded(prm_run):
    out, summary, _ = prm_run
    progress = json.loads((out / "progress.json").read_text())["completed"]
    assert progress.index("warmup") < progress.index("prm_collect") < progress.index("iter_1")
    assert [s for s in progress if s.startswith("prm_")] == list(PRM_STAGES)
    collected = [json.loads(line) for line in (out / "prm" / "responses.jsonl").read_text().splitlines()]
    assert len(collected) == 4 * 4 and all(r["steps_correct"] is not None for r in collected)
    labels = json.loads((out / "prm" / "labels" / "manifest.json").read_text())
    assert labels["done"] == [0, 1, 2, 3] and labels["settings"]["n"] == 2
    assert (out / "checkpoints" / "prm" / "prm_config.json").is_file()  # kept by the loop's pruning
    assert set(summary["stage_seconds"]) >= {*PRM_STAGES, "warmup", "evolve"}
    prm = summary["prm"]
    for key in ("step_auroc_val", "first_error_f1_val", "invalid_rate_all", "invalid_rate_top2"):
        assert key in prm and (prm[key] is None or 0.0 <= prm[key] <= 1.0)
    assert "invalid_rate_random2" in prm and prm["step_truth"] == "known" and prm["correct_with_truth"] > 0
    assert prm["completions"] > 0 and prm["labels_per_second"] > 0 and prm["train_steps"] == 2
    truth = prm["labels_against_truth"]  # the Monte-Carlo labels themselves against the gym's checker
    assert truth["steps"] == prm["step_labels"] and 0.0 <= truth["positive_if_right"] <= 1.0


def test_the_loop_ranks_by_the_prm_and_logs_reward_pass_at_2(prm_run):
    out, summary, _ = prm_run
    (it,) = summary["iterations"]
    assert 0.0 <= it["val_reward_pass_at_k"] <= 1.0 and it["val_pass_at_k"] is not None
    assert "kept_steps_all_correct" in it and it["prm_score_seconds"] >= 0
    samples = [json.loads(line) for line in (out / "samples" / "iter_001.jsonl").read_text().splitlines()]
    # top-2 selection reads the scores of the correct responses only: the wrong ones go unscored
    assert any(not s["correct"] for s in samples)
    assert all(s["score"] is None for s in samples if not s["correct"])
    assert all(
        s["score"] is not None and len(s["step_scores"]) == len(s["steps_correct"])
        for s in samples
        if s["correct"] and s["text"]
    )
    correct = Counter(s["sample_id"] for s in samples if s["correct"])
    assert it["kept"] == sum(min(2, n) for n in correct.values()) > 0  # top-2 of each prompt's correct ones
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["stage"] for m in lines if m["stage"].startswith("prm_")] == list(PRM_STAGES)


def test_a_resumed_run_reuses_the_trained_prm(prm_run):
    out, summary, overrides = prm_run
    weights = out / "checkpoints" / "prm" / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    progress = json.loads((out / "progress.json").read_text())
    for stage in ("prm_eval", "iter_1", "final"):  # killed right after the PRM was trained
        progress["completed"].remove(stage)
        progress["results"].pop(stage)
    (out / "progress.json").write_text(json.dumps(progress))
    again = run_experiment(load_config(None, overrides), resume=True)
    assert weights.stat().st_mtime_ns == mtime  # reloaded, not retrained
    drop = ("seconds", "labels_per_second")
    assert {k: v for k, v in again["prm"].items() if k not in drop} == {
        k: v for k, v in summary["prm"].items() if k not in drop
    }
    assert again["iterations"][0]["val_reward_pass_at_k"] == summary["iterations"][0]["val_reward_pass_at_k"]


def test_a_labelling_killed_between_chunks_resumes_in_the_run(prm_run):
    out, summary, overrides = prm_run
    labels = out / "prm" / "labels"
    before = {p.name: p.read_text() for p in labels.glob("chunk_*.jsonl")}
    manifest = json.loads((labels / "manifest.json").read_text())
    manifest["done"].remove(3)  # killed while labelling the last chunk
    (labels / "manifest.json").write_text(json.dumps(manifest))
    (labels / "chunk_00003.jsonl").unlink()
    progress = json.loads((out / "progress.json").read_text())
    for stage in ("prm_label", "prm_train", "prm_eval", "iter_1", "final"):
        progress["completed"].remove(stage)
        progress["results"].pop(stage)
    (out / "progress.json").write_text(json.dumps(progress))
    again = run_experiment(load_config(None, overrides), resume=True)
    assert {p.name: p.read_text() for p in labels.glob("chunk_*.jsonl")} == before  # chunk 3 drawn again, the same
    assert again["prm"]["step_labels"] == summary["prm"]["step_labels"]
    assert again["prm"]["train_loss"] == pytest.approx(summary["prm"]["train_loss"])
    assert again["iterations"][0]["kept"] == summary["iterations"][0]["kept"]


def test_an_old_format_run_without_the_prm_section_resumes(tiny):
    out = tiny / "run_old"
    overrides = _overrides(tiny, out, "warmup.steps=0", "eval.pass_k=0", "evolve.steps_per_iteration=1")
    first = run_experiment(load_config(None, overrides))
    saved = yaml.safe_load((out / "config.yaml").read_text())
    del saved["prm"]  # as evostar wrote it before the PRM section
    (out / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    again = run_experiment(load_config(None, overrides), resume=True)
    assert "prm" not in again and again["iterations"] == first["iterations"]
    assert "prm" in yaml.safe_load((out / "config.yaml").read_text())  # written back complete


def test_prm_eval_on_the_gym_judges_steps_against_the_truth(prm_run, tiny):
    out, _, _ = prm_run
    args = ["prm", "eval", "--prm", str(out / "checkpoints" / "prm"), "--policy", str(out / "checkpoints" / "warmup")]
    result = CliRunner().invoke(app, [*args, "--data", str(tiny / "data" / "seed.json"), "--k", "4"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{") :])
    assert report["step_truth"] == "known" and 0.0 <= report["step_auroc"] <= 1.0
    assert set(report["first_error_f1"]) >= {"f1", "error_acc", "correct_acc"}
    assert set(report["accuracy"]["majority"]) == {"1", "2", "4"}
    top2 = report["correct_top2_vs_rest"]["top2"]
    assert top2["n"] > 0 and 0.0 <= top2["all_steps_correct"] <= 1.0 and top2["mean_steps"] > 0
