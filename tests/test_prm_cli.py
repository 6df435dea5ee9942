"""`evostar prm collect | label | train | eval` end to end on a tiny LLaVA (not the gym's model
family) and hand-written MathV360K-format data without process ground truth: there `prm eval`
reports the voting curves and says that step truth is unknown."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image, ImageDraw
from tiny_families import build_tiny_llava
from typer.testing import CliRunner

from evostar.cli import app
from evostar.records import Response

pytestmark = pytest.mark.usefixtures("one_thread")

runner = CliRunner()


def _steps(dots: int) -> str:
    return f"I count the dots.\n\nThere are {dots} dots."


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """MathV360K records (id, relative image, human/gpt turns with the answer only) and a tiny
    LLaVA whose tokenizer knows their text."""
    root = tmp_path_factory.mktemp("prm_cli")
    (root / "imgs").mkdir()
    records = []
    for i, dots in enumerate((1, 2, 3, 2)):
        img = Image.new("RGB", (28, 28), "white")
        for d in range(dots):
            ImageDraw.Draw(img).ellipse((3 + 8 * d, 10, 9 + 8 * d, 16), fill="black")
        img.save(root / "imgs" / f"{i}.png")
        records.append(
            {
                "id": f"m-{i}",
                "image": f"imgs/{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nHow many dots are there?"},
                    {"from": "gpt", "value": str(dots)},
                ],
            }
        )
    (root / "data.json").write_text(json.dumps(records))
    unlabelled = [{**r, "conversations": r["conversations"][:1]} for r in records[:2]]
    (root / "unlabelled.json").write_text(json.dumps(unlabelled))
    texts = ["How many dots are there?", "# Answer\n\n", _steps(2), "1 2 3 dots"]
    build_tiny_llava(texts, root / "model")
    return root


def _json(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)  # stdout holds the JSON alone


def _fails(args: list[str], *needles: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in result.output, (needle, result.output)


def test_prm_commands_end_to_end_without_step_truth(tiny, tmp_path):
    model, data = str(tiny / "model"), str(tiny / "data.json")
    responses = tmp_path / "responses.jsonl"
    common = ["--policy", model, "--data", data]
    collected = _json(
        runner.invoke(app, ["prm", "collect", *common, "--out", str(responses), "--k", "2", "--max-new-tokens", "10"])
    )
    assert collected["prompts"] == 4 and collected["responses"] == 8
    rows = [json.loads(line) for line in responses.read_text().splitlines()]
    assert len(rows) == 8 and all(r["correct"] is not None and r["steps_correct"] is None for r in rows)
    # what a random-init model cannot write: responses with steps and an answer block, right and wrong
    extra = [Response(f"m-{i}", f"{_steps(d)}\n\n# Answer\n\n{d}") for i, d in ((0, 1), (1, 2), (2, 2))]
    with responses.open("a") as f:
        f.writelines(json.dumps(r.to_dict()) + "\n" for r in extra)

    labels = tmp_path / "labels"
    label_args = [*common, "--responses", str(responses), "--out", str(labels), "--n-completions", "2"]
    labelled = _json(runner.invoke(app, ["prm", "label", *label_args, "--max-new-tokens", "6", "--chunk-size", "4"]))
    assert labelled["responses"] == 11 and labelled["step_labels"] >= 6 and labelled["completions"] > 0
    assert json.loads((labels / "manifest.json").read_text())["done"] == [0, 1, 2]

    prm = tmp_path / "prm"
    trained = _json(
        runner.invoke(
            app,
            ["prm", "train", "--init", model, "--data", data, "--labels", str(labels), "--out", str(prm)]
            + ["--steps", "2", "--batch-size", "4"],
        )
    )
    assert trained["steps"] == 2 and trained["examples"] >= 3 and (prm / "prm_config.json").is_file()

    out, plot = tmp_path / "eval.json", tmp_path / "eval.png"
    eval_args = ["prm", "eval", "--prm", str(prm), *common, "--k", "4", "--max-new-tokens", "10"]
    report = _json(runner.invoke(app, [*eval_args, "--out", str(out), "--plot", str(plot)]))
    assert report["step_truth"] == "unknown" and "step_auroc" not in report and "first_error_f1" not in report
    acc = report["accuracy"]
    assert {k: set(v) for k, v in acc.items() if k != "greedy"} == {
        name: {"1", "2", "4"} for name in ("best_of_n", "majority", "weighted")
    }
    assert 0.0 <= acc["greedy"] <= 1.0 and all(
        0.0 <= x <= 1.0 for v in acc.values() if v != acc["greedy"] for x in v.values()
    )
    top2 = report["correct_top2_vs_rest"]["top2"]
    assert top2["all_steps_correct"] is None  # no step truth: unknown, not zero
    assert json.loads(out.read_text()) == report
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 5000


def test_prm_commands_refuse_bad_input_naming_it(tiny, tmp_path):
    model, data = str(tiny / "model"), str(tiny / "data.json")
    common = ["--policy", model, "--data", data]
    responses = tmp_path / "r.jsonl"
    responses.write_text(json.dumps(Response("m-0", "There are 1 dots.\n\n# Answer\n\n1").to_dict()) + "\n")
    label = ["prm", "label", "--responses", str(responses), "--out", str(tmp_path / "labels")]
    _fails([*label, *common, "--strategy", "all"], "strategy='all'", "binary")
    _fails(
        [*label, "--policy", model, "--data", str(tiny / "unlabelled.json")], "unlabelled.json record 0", "no answer"
    )
    responses.write_text(json.dumps(Response("m-9", "There are 1 dots.").to_dict()) + "\n")
    _fails([*label, *common], "r.jsonl line 1", "'m-9' is not a record of")
    responses.write_text('{"sample_id": "m-0"}\n')
    _fails([*label, *common], "r.jsonl line 1", "'text'")
    _fails(["prm", "eval", "--prm", model, *common, "--k", "2"], "not a PRM checkpoint")
    _fails(["prm", "eval", "--prm", model, *common, "--temperature", "0"], "--temperature 0.0")
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "notes.txt").write_text("mine")
    train = ["prm", "train", "--init", model, "--data", data, "--labels", str(tmp_path / "labels")]
    _fails([*train, "--out", str(tmp_path / "keep")], "keep: exists and is not a PRM checkpoint")
    assert (tmp_path / "keep" / "notes.txt").read_text() == "mine"
