"""`evostar score`: MathVista accuracy of saved responses, through the real command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from evostar.cli import app

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")


def _problem(pid: str, answer: str, task: str, **kw: Any) -> dict[str, Any]:
    """A record as testmini.json ships it (choices None for free form, metadata nested)."""
    rec = {
        "pid": pid,
        "question": "q",
        "image": f"images/{pid}.jpg",
        "choices": None,
        "unit": None,
        "precision": None,
        "answer": answer,
        "question_type": "free_form",
        "answer_type": "integer",
        "metadata": {
            "language": "english",
            "skills": ["arithmetic reasoning"],
            "source": "s",
            "task": task,
            "category": "math-targeted-vqa",
            "context": "synthetic scene",
            "grade": "high school",
        },
    }
    rec.update(kw)
    return rec


PROBLEMS = {
    "1": _problem("1", "7", "figure question answering"),
    "2": _problem(
        "2",
        "rectangle",
        "geometry problem solving",
        question_type="multi_choice",
        answer_type="text",
        choices=["square", "rectangle", "circle"],
    ),
    "3": _problem("3", "1.5", "math word problem", answer_type="float", precision=1.0),
    "4": _problem("4", "12", "math word problem"),
}
RESPONSES = {
    "1": "Count the bars.\n\n# Answer\n\n7",  # right
    "2": "Two pairs of equal sides and right angles.\n\n# Answer\n\nB",  # right (letter -> option)
    "3": "Half of three.\n\n# Answer\n\n1.50",  # right at precision 1
    # "4": no response -> wrong, counted as missing
}


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    data = tmp_path / "testmini.json"
    data.write_text(json.dumps(PROBLEMS))
    resp = tmp_path / "responses.jsonl"
    resp.write_text("".join(json.dumps({"pid": p, "response": r}) + "\n" for p, r in RESPONSES.items()))
    evalr = tmp_path / "eval_responses.jsonl"  # what `evostar eval --responses` writes
    evalr.write_text(
        "".join(
            json.dumps(
                {
                    "sample_id": p,
                    "text": r,
                    "temperature": 0.0,
                    "iteration": -1,
                    "extracted": None,
                    "correct": None,
                    "steps_correct": None,
                    "step_scores": None,
                    "score": None,
                }
            )
            + "\n"
            for p, r in RESPONSES.items()
        )
    )
    return {"data": data, "responses": resp, "eval": evalr, "dir": tmp_path}


def _score(data: Path, responses: Path, *extra: str):
    return runner.invoke(
        app, ["score", "--benchmark", "mathvista", "--data", str(data), "--responses", str(responses), *extra]
    )


def _summary(stdout: str) -> dict[str, Any]:
    return json.loads(stdout[stdout.index("{") :])


def test_score_prints_accuracy_and_by_task_and_writes_items(files):
    items = files["dir"] / "out" / "items.jsonl"
    result = _score(files["data"], files["responses"], "--out-items", str(items))
    assert result.exit_code == 0, result.output
    summary = _summary(result.stdout)
    assert summary["accuracy"] == pytest.approx(0.75) and summary["n"] == 4 and summary["correct"] == 3
    assert summary["missing"] == 1 and summary["extra"] == 0
    assert summary["by_task"]["math word problem"] == {"accuracy": 0.5, "n": 2, "correct": 1}
    assert summary["by_task"]["geometry problem solving"]["accuracy"] == 1.0
    assert summary["by_task_short"]["MWP"]["n"] == 2 and "items" not in summary
    rows = [json.loads(line) for line in items.read_text().splitlines()]
    assert [r["pid"] for r in rows] == ["1", "2", "3", "4"]
    assert [r["true_false"] for r in rows] == [True, True, True, False]
    assert rows[1]["prediction"] == "rectangle" and rows[3]["missing"] and rows[3]["response"] is None
    assert rows[0]["response"] == RESPONSES["1"]
    assert "1 of 4 problems have no response" in result.stderr


def test_score_reads_eval_responses(files):
    direct = _summary(_score(files["data"], files["responses"]).stdout)
    result = _score(files["data"], files["eval"])
    assert result.exit_code == 0, result.output
    via_eval = _summary(result.stdout)
    drop = ("responses",)
    assert {k: v for k, v in via_eval.items() if k not in drop} == {k: v for k, v in direct.items() if k not in drop}


def test_unknown_benchmark(files):
    result = runner.invoke(
        app, ["score", "--benchmark", "mmstar", "--data", str(files["data"]), "--responses", str(files["responses"])]
    )
    assert result.exit_code == 2 and "mmstar" in result.output and "mathvista" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    "which, content, expect",
    [
        ("responses", '{"pid": "1", "response": "7"}\n{oops\n', ["responses.jsonl", "line 2", "invalid JSON"]),
        ("responses", '{"pid": "1"}\n', ["responses.jsonl", "line 1", "'response'"]),
        ("responses", '{"pid": "1", "response": "a"}\n\n{"pid": "1", "response": "b"}\n', ["line 3", "duplicate"]),
        ("eval", '{"sample_id": "1", "text": "7"}\n{"sample_id": "2"}\n', ["eval_responses.jsonl", "line 2", "'text'"]),
        ("eval", '{"sample_id": "1", "text": "7"}\n[1]\n', ["eval_responses.jsonl", "line 2", "JSON object"]),
        (
            "data",
            '{"1": {"pid": "1", "answer": "7", "question_type": "free_form"}}',
            ["testmini.json", "'answer_type'"],
        ),
        ("data", '{"1": {"pid": "1",\n "answer": }', ["testmini.json", "line 2", "invalid JSON"]),
    ],
)
def test_bad_input_names_file_and_line(files, which, content, expect):
    files[which].write_text(content)
    resp = files["eval"] if which == "eval" else files["responses"]
    result = _score(files["data"], resp)
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    # rich wraps at the terminal width, inside long paths or in place of a space: compare text
    # with all whitespace removed
    out = "".join(result.output.split())
    for needle in expect:
        assert "".join(needle.split()) in out, (needle, result.output)


def test_missing_files(files):
    result = _score(files["dir"] / "nope.json", files["responses"])
    assert result.exit_code == 2 and "nope.json" in result.output.replace("\n", "")
    result = _score(files["data"], files["dir"] / "nope.jsonl")
    assert result.exit_code == 2 and "nope.jsonl" in result.output.replace("\n", "")
