"""The command line: clear errors (file, record, field) instead of tracebacks, and eval output."""

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from evostar.cli import app
from evostar.data.gym import build_gym
from evostar.demo import gym_texts
from evostar.models.tiny import TinyModelSpec, build_tiny_qwen2_vl

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    build_gym(root / "data", seed=0, n_seed=8, n_train=8, n_val=4, n_test_id=6, n_test_ood=4)
    build_tiny_qwen2_vl(gym_texts(root / "data"), root / "model", TinyModelSpec(num_layers=1))
    return root


def _record(rid, image="img.png", answer="7"):
    rec = {"id": rid, "image": image, "conversations": [{"from": "human", "value": "<image>\nHow many?"}]}
    if answer is not None:
        rec["conversations"].append({"from": "gpt", "value": answer})
    return rec


def _eval(tiny: Path, data: Path):
    return runner.invoke(app, ["eval", "--model", str(tiny / "model"), "--data", str(data)])


def test_eval_prints_accuracy_json(tiny):
    result = _eval(tiny, tiny / "data" / "test_id.json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout[result.stdout.index("{") :])
    metrics = out[str(tiny / "data" / "test_id.json")]
    assert metrics["n"] == 6 and 0.0 <= metrics["accuracy"] <= 1.0


@pytest.mark.parametrize(
    "case, expect",
    [
        ("missing_image", ["bad.json", "record 1", "'r1'", "image", "not found"]),
        ("corrupt_image", ["bad.json", "record 0", "'r0'", "image"]),
        ("no_answer", ["bad.json", "record 1", "'r1'"]),
        ("malformed_line", ["bad.jsonl", "line 2"]),
    ],
)
def test_bad_data_names_file_and_record(tiny, tmp_path, case, expect):
    Image.new("RGB", (84, 28), "white").save(tmp_path / "img.png")
    if case == "missing_image":
        data = [_record("r0"), _record("r1", image="gone.png")]
    elif case == "corrupt_image":
        (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
        data = [_record("r0", image="broken.png")]
    elif case == "no_answer":
        data = [_record("r0"), _record("r1", answer=None)]
    if case == "malformed_line":
        path = tmp_path / "bad.jsonl"
        path.write_text(json.dumps({"id": "a", "image": "img.png", "question": "q", "answer": "1"}) + "\n{oops\n")
    else:
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(data))
    result = _eval(tiny, path)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for needle in expect:
        assert needle in result.output, (needle, result.output)


def test_unknown_model_path(tmp_path):
    result = runner.invoke(app, ["eval", "--model", str(tmp_path / "no-model"), "--data", "x.json"])
    assert result.exit_code == 2
    assert "no-model" in result.output and "Traceback" not in result.output


def test_not_a_model_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["eval", "--model", str(tmp_path / "empty"), "--data", "x.json"])
    assert result.exit_code == 2 and "config.json" in result.output


def test_evolve_with_bad_config_key(tmp_path):
    result = runner.invoke(app, ["evolve", "model.path=x", "evolve.iteratons=2"])
    assert result.exit_code == 2 and "iteratons" in result.output


def test_demo_mix_is_parsed_and_bad_mixes_are_named(tmp_path):
    from evostar.demo import parse_mix

    assert parse_mix("arith=0.7, compare=0.15,bars=0.15") == (("arith", 0.7), ("compare", 0.15), ("bars", 0.15))
    for bad, expect in (
        ("arith=0.5,dice=0.5", "'dice=0.5'"),
        ("arith", "'arith'"),
        ("arith=-1", "'arith=-1'"),
        ("arith=0.5,arith=0.5", "each family once"),
        ("arith=0", "sum above 0"),
    ):
        result = runner.invoke(app, ["demo", "--preset", "smoke", "--out", str(tmp_path / "d"), "--mix", bad])
        assert result.exit_code != 0 and "Traceback" not in result.output
        assert "--mix" in result.output and expect in result.output, result.output
    assert not (tmp_path / "d").exists()  # refused before anything was built
