"""Bad input, class by class, through the real command line: every refusal is one line that
names the file, record, field or key; no traceback, no hang, no silent wrong run, nothing
finished lost. (Config values of every key: tests/test_config.py.)"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from evostar.cli import app
from evostar.data.gym import build_gym
from evostar.demo import gym_texts
from evostar.models.tiny import TinyModelSpec, build_tiny_qwen2_vl

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad-input")
    build_gym(root / "data", seed=0, n_seed=6, n_train=8, n_val=4, n_test_id=4, n_test_ood=4)
    build_tiny_qwen2_vl(
        gym_texts(root / "data"), root / "model", TinyModelSpec(num_layers=1, max_position_embeddings=128)
    )
    return root


def base_config(tiny: Path, out: Path, **data) -> dict:
    """A run that takes seconds: base and final evaluation, no warm-up, no iterations."""
    files = {
        "train": str(tiny / "data" / "train.json"),
        "val": str(tiny / "data" / "val.json"),
        "test": {"test_id": str(tiny / "data" / "test_id.json")},
    }
    files.update(data)
    return {
        "output_dir": str(out),
        "progress": False,
        "threads": 1,
        "model": {"path": str(tiny / "model")},
        "data": files,
        "gen": {"k": 2, "max_new_tokens": 8, "batch_size": 16, "eval_batch_size": 16},
        "warmup": {"steps": 0},
        "evolve": {"iterations": 0},
        "eval": {"pass_k": 0},
    }


def evolve(config: dict, tmp_path: Path, *extra: str):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return runner.invoke(app, ["evolve", "--config", str(path), *extra])


def refused(result, *needles: str) -> None:
    out = result.output
    assert result.exit_code == 2, out
    assert "Traceback" not in out and "internal error" not in out, out
    assert out.count("error:") == 1, out
    for needle in needles:
        assert needle in out, (needle, out)


def record(rid: str, question: str = "How many?", answer=7, image: str | None = None) -> dict:
    return {"id": rid, "image": image, "question": question, "answer": answer}


# ----------------------------------------------------------------------------- data
@pytest.mark.parametrize(
    "role, content, needles",
    [
        ("train", "[]", ["no records", "train"]),
        ("val", "", ["no records", "val"]),
        ("test", "[]", ["no records", "test"]),
        ("train", [record("a", answer=["12"])], ["record 0", "'answer'", "list"]),
        ("train", [record("a", answer={"x": 1})], ["record 0", "'answer'", "dict"]),
        ("val", [record("a"), record("b", answer=True)], ["record 1", "'answer'", "bool"]),
        ("train", [{**record("a"), "id": [1]}], ["record 0", "'id'"]),
        ("train", [{**record("a", answer="A"), "choices": [{"x": 1}, "b"]}], ["record 0", "'choices'"]),
        ("train", [record("a", question="")], ["record 0", "'question'"]),
        ("train", [record("a", answer=float("nan"))], ["record 0", "'answer'", "finite"]),
        (
            "train",
            [{"id": "a", "conversations": [{"from": "human", "value": ["How many?"]}]}],
            ["record 0", "'conversations'", "text"],
        ),
        ("train", '"just a string"', ["expected a JSON list"]),
        ("train", "{not json", ["malformed JSON"]),
        ("train", [record("a"), record("a")], ["record 1", "duplicate"]),
        ("train", [record("a", question="seven " * 200)], ["record 0", "'question'", "context of 128 tokens"]),
        ("val", [record("a", image="missing.png")], ["record 0", "'image'", "not found"]),
        ("val", [record("a", image="sliver.png")], ["record 0", "'image'", "processor cannot take"]),
    ],
)
def test_bad_data_is_refused_naming_file_record_and_field(tiny, tmp_path, role, content, needles):
    Image.new("RGB", (600, 2), "white").save(tmp_path / "sliver.png")  # aspect ratio Qwen2-VL refuses
    path = tmp_path / f"bad_{role}.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    data = {"test": {"test_id": str(path)}} if role == "test" else {role: str(path)}
    result = evolve(base_config(tiny, tmp_path / "run", **data), tmp_path)
    refused(result, str(path) if "JSON" not in needles[0] else path.name, *needles)
    assert not (tmp_path / "run").exists(), "refused before the run directory was made"


def test_non_utf8_data_file(tiny, tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes('{"id": "a", "question": "caf\xe9", "answer": 1}\n'.encode("latin-1"))
    refused(evolve(base_config(tiny, tmp_path / "run", train=str(path)), tmp_path), "latin.jsonl", "UTF-8")


@pytest.mark.parametrize(
    "overrides, needles",
    [
        ({"warmup": {"steps": 5}}, ["warmup.steps=5", "no warm-up set"]),
        ({"warmup": {"steps": 5}, "data": {"seed_cot": "EMPTY"}}, ["no records", "seed_cot"]),
        ({"warmup": {"steps": 5}, "data": {"seed_cot": "NO_RATIONALE"}}, ["chain of thought"]),
    ],
)
def test_a_warmup_without_a_usable_set_is_refused(tiny, tmp_path, overrides, needles):
    (tmp_path / "empty.json").write_text("[]")
    (tmp_path / "plain.json").write_text(json.dumps([record("a")]))
    config = base_config(tiny, tmp_path / "run")
    config["warmup"].update(overrides["warmup"])
    seed = overrides.get("data", {}).get("seed_cot")
    if seed:
        config["data"]["seed_cot"] = str(tmp_path / ("empty.json" if seed == "EMPTY" else "plain.json"))
    refused(evolve(config, tmp_path), *needles)


# ----------------------------------------------------------------------------- model folders
def _break_model(model: Path, how: str) -> None:
    weights = model / "model.safetensors"
    if how == "zero_byte_weights":
        weights.write_bytes(b"")
    elif how == "truncated_weights":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif how == "no_weights":
        weights.unlink()
    elif how == "no_tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (model / name).unlink(missing_ok=True)
    elif how == "bad_config_json":
        (model / "config.json").write_text("{oops")
    elif how == "weights_missing_a_tensor":
        from safetensors.torch import load_file, save_file

        tensors = load_file(weights)
        del tensors[sorted(tensors)[3]]
        save_file(tensors, weights, metadata={"format": "pt"})
    elif how == "no_chat_template":
        (model / "chat_template.jinja").unlink()
    elif how == "unknown_model_type":
        config = json.loads((model / "config.json").read_text())
        config["model_type"] = "no_such_architecture"
        (model / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "how",
    ["zero_byte_weights", "truncated_weights", "no_weights", "no_tokenizer", "bad_config_json", "unknown_model_type"],
)
@pytest.mark.parametrize("command", ["evolve", "eval"])
def test_a_broken_model_folder_is_named(tiny, tmp_path, how, command):
    model = tmp_path / "model"
    shutil.copytree(tiny / "model", model)
    _break_model(model, how)
    if command == "evolve":
        config = base_config(tiny, tmp_path / "run")
        config["model"]["path"] = str(model)
        result = evolve(config, tmp_path)
    else:
        result = runner.invoke(app, ["eval", "--model", str(model), "--data", str(tiny / "data" / "val.json")])
    refused(result, str(model))


# ----------------------------------------------------------------------------- run directories, config files
def test_output_dir_that_is_a_file(tiny, tmp_path):
    (tmp_path / "taken").write_text("x")
    refused(evolve(base_config(tiny, tmp_path / "taken"), tmp_path), "taken", "is a file")


def test_config_file_that_is_a_list(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- model.path: x\n")
    refused(runner.invoke(app, ["evolve", "--config", str(path)]), "list.yaml", "mapping")


@pytest.mark.parametrize("state", ["missing", "empty"])
def test_resume_with_nothing_to_resume(tiny, tmp_path, state):
    if state == "empty":
        (tmp_path / "run").mkdir()
    refused(evolve(base_config(tiny, tmp_path / "run"), tmp_path, "--resume"), "nothing to resume")


def _digest(run: Path) -> dict[str, str]:
    return {
        str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def finished_run(tiny, tmp_path):
    config = base_config(tiny, tmp_path / "run")
    result = evolve(config, tmp_path)
    assert result.exit_code == 0, result.output
    return config


@pytest.mark.parametrize(
    "change, needles",
    [
        ({"seed": 5}, ["seed: 0 -> 5"]),
        ({"gen": {"max_new_tokens": 9}}, ["gen.max_new_tokens: 8 -> 9"]),
        ({"data": {"max_val": 2}}, ["data.max_val: 0 -> 2"]),
    ],
)
def test_resume_with_a_different_config_is_refused_and_loses_nothing(finished_run, tmp_path, change, needles):
    run = Path(finished_run["output_dir"])
    before = _digest(run)
    changed = json.loads(json.dumps(finished_run))
    for key, value in change.items():
        changed[key] = {**changed[key], **value} if isinstance(value, dict) else value
    refused(evolve(changed, tmp_path, "--resume"), "differ", *needles)
    assert _digest(run) == before


def test_resume_may_change_speed_and_logging_keys(finished_run, tmp_path):
    changed = {**finished_run, "threads": 2, "progress": True}
    result = evolve(changed, tmp_path, "--resume")
    assert result.exit_code == 0, result.output


def test_truncated_progress_file_on_resume(finished_run, tmp_path):
    progress = Path(finished_run["output_dir"]) / "progress.json"
    progress.write_text(progress.read_text()[:20])
    refused(evolve(finished_run, tmp_path, "--resume"), "progress.json")


def test_a_run_directory_in_use_is_not_overwritten(finished_run, tmp_path):
    refused(evolve(finished_run, tmp_path), "holds a run already", "--resume")


def test_strict_json_in_the_run_directory(finished_run):
    run = Path(finished_run["output_dir"])
    for path in [run / "summary.json", run / "progress.json", run / "metrics.jsonl"]:
        assert "NaN" not in path.read_text() and "Infinity" not in path.read_text()


def test_unwritable_responses_file_is_named(tiny, tmp_path):
    target = tmp_path / "a_directory"
    target.mkdir()
    data = str(tiny / "data" / "val.json")
    result = runner.invoke(app, ["eval", "--model", str(tiny / "model"), "--data", data, "--responses", str(target)])
    refused(result, "a_directory")


def test_internal_errors_say_so_and_debug_shows_the_traceback(monkeypatch, tmp_path):
    import evostar.config

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(evostar.config, "load_config", boom)
    monkeypatch.setenv("EVOSTAR_DEBUG", "0")  # restored after the test (--debug sets it)
    result = runner.invoke(app, ["config"])
    assert result.exit_code == 1 and "internal error" in result.output and "boom" in result.output
    result = runner.invoke(app, ["--debug", "config"])
    assert isinstance(result.exception, RuntimeError)


def test_a_config_key_given_twice(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("gen:\n  k: 2\n  k: 3\n")
    refused(runner.invoke(app, ["config", "--config", str(path)]), "twice.yaml", "line 3", "given twice")


@pytest.fixture
def iterated_run(tiny, tmp_path):
    """A run with one finished iteration (so it has a loop checkpoint)."""
    config = base_config(tiny, tmp_path / "run")
    config["evolve"] = {"iterations": 1, "steps_per_iteration": 1, "optim": {"batch_size": 2}}
    result = evolve(config, tmp_path)
    assert result.exit_code == 0, result.output
    return config


@pytest.mark.parametrize(
    "damage, needles",
    [
        ("progress_completed_not_a_list", ["progress.json", "not an evostar progress file"]),
        ("progress_results_a_list", ["progress.json", "not an evostar progress file"]),
        ("state_a_list", ["state.json", "expected a JSON object"]),
        ("state_extra_key", ["state.json", "not a loop state"]),
        ("state_bad_types", ["state.json", "not a loop state"]),
        ("no_trainer_state", ["trainer.pt", "missing"]),
        ("no_config_yaml", ["config.yaml is missing"]),
    ],
)
def test_a_damaged_run_directory_is_named_on_resume(iterated_run, tmp_path, damage, needles):
    run = Path(iterated_run["output_dir"])
    progress = json.loads((run / "progress.json").read_text())
    # resume the loop: the final stage and the iteration's finish are undone
    progress["completed"] = [s for s in progress["completed"] if s != "final"]
    state = run / "checkpoints" / "iter_1" / "state.json"
    saved = json.loads(state.read_text())
    if damage == "progress_completed_not_a_list":
        progress["completed"] = "base"
    elif damage == "progress_results_a_list":
        progress["results"] = []
    elif damage == "state_a_list":
        state.write_text("[]")
    elif damage == "state_extra_key":
        state.write_text(json.dumps({**saved, "bogus": 1}))
    elif damage == "state_bad_types":
        state.write_text(json.dumps({**saved, "cursor": "many"}))
    elif damage == "no_trainer_state":
        (run / "checkpoints" / "iter_1" / "trainer.pt").unlink()
    elif damage == "no_config_yaml":
        (run / "config.yaml").unlink()
    (run / "progress.json").write_text(json.dumps(progress))
    refused(evolve(iterated_run, tmp_path, "--resume"), *needles)


def test_garbage_in_metrics_does_not_stop_a_resume(finished_run, tmp_path):
    metrics = Path(finished_run["output_dir"]) / "metrics.jsonl"
    metrics.write_bytes(metrics.read_bytes() + b"\xc2\xff garbage\n")
    result = evolve(finished_run, tmp_path, "--resume")
    assert result.exit_code == 0, result.output
    assert all(json.loads(line) for line in metrics.read_text().splitlines())


@pytest.mark.parametrize("summary", ["[]", '{"accuracy": {}}', '{"iterations": []}'])
def test_report_on_a_damaged_summary(finished_run, summary):
    path = Path(finished_run["output_dir"]) / "summary.json"
    path.write_text(summary)
    refused(runner.invoke(app, ["report", str(path.parent)]), "summary.json", "not an evostar summary")


def test_report_on_an_unfinished_run(tmp_path):
    (tmp_path / "run").mkdir()
    refused(runner.invoke(app, ["report", str(tmp_path / "run")]), "no summary.json")


@pytest.mark.parametrize(
    "problems, needles",
    [
        (b"\xbf\xff\x00", ["UTF-8"]),
        (b"[]", ["no problems"]),
        (b'{"1": {"question_type": "free_form", "answer_type": "integer", "answer": null}}', ["'answer'"]),
        (b'{"1": {"question_type": "free_form", "answer_type": "mystery", "answer": "1"}}', ["'answer_type'"]),
    ],
)
def test_score_refuses_bad_problem_files(tmp_path, problems, needles):
    data = tmp_path / "problems.json"
    data.write_bytes(problems)
    responses = tmp_path / "r.jsonl"
    responses.write_text(json.dumps({"pid": "1", "response": "# Answer\n\n1"}) + "\n")
    refused(
        runner.invoke(app, ["score", "--data", str(data), "--responses", str(responses)]), "problems.json", *needles
    )


def test_output_files_are_checked_before_compute(tiny, tmp_path):
    (tmp_path / "afile").write_text("x")
    data = str(tiny / "data" / "val.json")
    for target, needle in [
        (tmp_path / "afile" / "r.jsonl", "afile is not a directory"),
        (tmp_path, "not a regular file"),
    ]:
        result = runner.invoke(
            app, ["eval", "--model", str(tiny / "model"), "--data", data, "--responses", str(target)]
        )
        refused(result, str(target), needle)
        assert "eval" not in result.output.split("error:")[0]  # no evaluation ran first


def test_report_names_what_is_wrong_with_its_paths(finished_run, tmp_path):
    refused(runner.invoke(app, ["report", str(tmp_path / "nowhere")]), "no such directory")
    (tmp_path / "afile").write_text("x")
    refused(runner.invoke(app, ["report", str(tmp_path / "afile")]), "not a run directory")
    run = finished_run["output_dir"]
    refused(runner.invoke(app, ["report", run, "--out", str(tmp_path / "afile")]), "--out is a file")


@pytest.mark.parametrize("content", ["", "output_dir: x\nseed: 0\n"])
def test_a_damaged_saved_config_is_named_on_resume(finished_run, tmp_path, content):
    (Path(finished_run["output_dir"]) / "config.yaml").write_text(content)
    refused(evolve(finished_run, tmp_path, "--resume"), "config.yaml", "damaged")


def test_ctrl_c_says_interrupted_and_the_run_resumes(tiny, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    config = base_config(tiny, tmp_path / "run")
    config["evolve"] = {"iterations": 50, "steps_per_iteration": 1, "optim": {"batch_size": 2}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "evostar.cli", "evolve", "--config", str(tmp_path / "run.yaml")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    progress = tmp_path / "run" / "progress.json"
    deadline = time.time() + 120
    while time.time() < deadline and not (progress.exists() and "iter_1" in progress.read_text()):
        time.sleep(0.05)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 130, err[-2000:]
    assert "interrupted" in err and "Traceback" not in err and "internal error" not in err
    config["evolve"]["iterations"] = 2  # a shorter run than the one started is refused ...
    refused(evolve(config, tmp_path, "--resume"), "evolve.iterations: 50 -> 2")
