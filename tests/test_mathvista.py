"""MathVista-compatible rule-based scoring, on records in the testmini format."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from evostar.reward.mathvista import (
    ScoreInputError,
    extract_mathvista_answer,
    get_most_similar,
    load_mathvista_problems,
    load_responses_jsonl,
    normalize_extracted_answer,
    score_mathvista,
)


def _problem(
    pid: str,
    answer: str,
    *,
    question_type: str = "free_form",
    answer_type: str = "integer",
    choices: list[str] | None = None,
    precision: float | None = None,
    task: str = "figure question answering",
    skills: list[str] | None = None,
    grade: str = "high school",
) -> dict[str, Any]:
    """A record shaped like testmini.json (metadata nested, choices None for free form)."""
    return {
        "pid": pid,
        "question": "q",
        "image": f"images/{pid}.jpg",
        "choices": choices,
        "unit": None,
        "precision": precision,
        "answer": answer,
        "question_type": question_type,
        "answer_type": answer_type,
        "metadata": {
            "category": "math-targeted-vqa",
            "context": "synthetic scene",
            "grade": grade,
            "img_height": 480,
            "img_width": 640,
            "language": "english",
            "skills": skills or ["arithmetic reasoning"],
            "source": "CLEVR-Math",
            "split": "testmini",
            "task": task,
        },
    }


MC_CHOICES = ["parallelogram", "rectangle", "rhombus", "square"]


def _mc(pid: str = "mc", answer: str = "rectangle") -> dict[str, Any]:
    return _problem(
        pid,
        answer,
        question_type="multi_choice",
        answer_type="text",
        choices=MC_CHOICES,
        task="geometry problem solving",
        skills=["geometry reasoning"],
    )


def _score_one(problem: dict[str, Any], response: str) -> dict[str, Any]:
    result = score_mathvista({problem["pid"]: problem}, {problem["pid"]: response})
    return result["items"][0]


@pytest.mark.parametrize(
    "response",
    [
        "B",
        "(B)",
        "The shape has four right angles.\n\n# Answer\n\nB",
        "# Answer\n\n(B)",
        "# Answer\n\n(B) rectangle",
        "# Answer\n\nrectangle",
        "# Answer\n\nRectangle.",
        "# Answer\n\n\\boxed{B}",
        'The answer is "rectangle".',
        "All angles are right angles, so the answer is (B).",
        "# Answer\n\nrectangel",  # near miss: closest option by edit distance
        "# Answer\n\na rectangle",
    ],
)
def test_multi_choice_correct(response: str) -> None:
    item = _score_one(_mc(), response)
    assert item["prediction"] == "rectangle"
    assert item["true_false"] is True


@pytest.mark.parametrize("response", ["A", "# Answer\n\n(D)", "# Answer\n\nsquare", "# Answer\n\nsqare"])
def test_multi_choice_wrong(response: str) -> None:
    assert _score_one(_mc(), response)["true_false"] is False


def test_get_most_similar_first_on_ties() -> None:
    assert get_most_similar("rectangel", MC_CHOICES) == "rectangle"
    assert get_most_similar("x", ["ab", "cd"]) == "ab"


@pytest.mark.parametrize(
    ("response", "ok"),
    [
        ("12", True),
        ("12.0", True),
        ("# Answer\n\n12", True),
        ("# Answer\n\n12 cm", True),
        ("# Answer\n\n12\\text{ cm}^2", True),
        ("# Answer\n\n$x = 12$", True),
        ("# Answer\n\n\\boxed{12}", True),
        ("There are 3 + 9 = 12 objects.", True),  # no marker: the last number
        ("# Answer\n\n13", False),
        ("# Answer\n\n12.7", True),  # official int(float(x)) truncates: a known MathVista quirk
        ("# Answer\n\ntwelve", False),
        ("", False),
    ],
)
def test_free_form_integer(response: str, ok: bool) -> None:
    assert _score_one(_problem("i", "12"), response)["true_false"] is ok


def test_integer_with_units_and_thousands() -> None:
    item = _score_one(_problem("i", "1200"), "# Answer\n\n1,200 people")
    assert (item["extraction"], item["prediction"], item["true_false"]) == ("1200", "1200", True)


@pytest.mark.parametrize(
    ("response", "answer", "precision", "ok"),
    [
        ("# Answer\n\n1.3", "1.3", 1, True),
        ("# Answer\n\n1.26", "1.3", 1, True),
        ("# Answer\n\n1.3 m", "1.3", 1, True),
        ("# Answer\n\n\\frac{13}{10}", "1.3", 1, True),
        # Python's round(1.25, 1) is 1.2 (1.25 is exact; ties go to even), as in MathVista.
        ("# Answer\n\n1.25", "1.3", 1, False),
        ("# Answer\n\n1.25", "1.25", 2, True),
        ("# Answer\n\n1.254", "1.25", 2, True),
        ("# Answer\n\n1.3", "1.25", 2, False),
        ("# Answer\n\n1.2", "1.3", 1, False),
        ("# Answer\n\nabout one", "1.3", 1, False),
    ],
)
def test_free_form_float(response: str, answer: str, precision: int, ok: bool) -> None:
    problem = _problem("f", answer, answer_type="float", precision=float(precision))
    assert _score_one(problem, response)["true_false"] is ok


@pytest.mark.parametrize(
    ("response", "ok"),
    [
        ("# Answer\n\n[2, 3, 5]", True),
        ("# Answer\n\n[2,3,5]", True),
        ("# Answer\n\n2, 3, 5", True),
        ("# Answer\n\n[2.0, 3, 5]", True),
        ("# Answer\n\n[2, 5, 3]", False),
        ("# Answer\n\n[2, 3]", False),
        ("# Answer\n\nnone", False),
    ],
)
def test_free_form_list(response: str, ok: bool) -> None:
    problem = _problem("l", "[2, 3, 5]", answer_type="list")
    assert _score_one(problem, response)["true_false"] is ok


def test_normalize_matches_official_rules() -> None:
    assert normalize_extracted_answer("(C) rhombus", MC_CHOICES, "multi_choice", "text", None) == "rhombus"
    assert normalize_extracted_answer("B", MC_CHOICES, "multi_choice", "text", None) == "rectangle"
    assert normalize_extracted_answer("12.0", None, "free_form", "integer", None) == "12"
    assert normalize_extracted_answer("x", None, "free_form", "integer", None) is None
    assert normalize_extracted_answer("3.14159", None, "free_form", "float", 2) == "3.14"
    assert normalize_extracted_answer(None, None, "free_form", "float", 2) is None


def test_extraction_official_shortcuts() -> None:
    assert extract_mathvista_answer("rhombus", _mc()) == "rhombus"
    assert extract_mathvista_answer("7", _problem("i", "7")) == "7"
    assert extract_mathvista_answer("", _problem("i", "7")) == ""


def test_score_aggregation() -> None:
    problems = {
        "1": _problem("1", "12", task="figure question answering", skills=["arithmetic reasoning"]),
        "2": _problem(
            "2",
            "5",
            task="math word problem",
            skills=["arithmetic reasoning", "algebraic reasoning"],
            grade="elementary school",
        ),
        "3": _mc("3"),
        "4": _problem("4", "1.5", answer_type="float", precision=1.0, task="math word problem"),
        "5": _problem("5", "9", task="visual question answering"),
    }
    responses = {
        "1": "# Answer\n\n12",  # right
        "2": "# Answer\n\n6",  # wrong
        "3": "# Answer\n\n(B)",  # right
        "4": "# Answer\n\n1.5",  # right
        # "5" missing
        "99": "# Answer\n\n1",  # not a problem
    }
    result = score_mathvista(problems, responses)
    assert (result["n"], result["correct"]) == (5, 3)
    assert result["accuracy"] == pytest.approx(0.6)
    assert (result["missing"], result["missing_pids"], result["extra"]) == (1, ["5"], 1)

    by_task = result["by_task"]
    assert by_task["math word problem"] == {"accuracy": 0.5, "n": 2, "correct": 1}
    assert by_task["figure question answering"]["correct"] == 1
    assert by_task["visual question answering"] == {"accuracy": 0.0, "n": 1, "correct": 0}
    assert result["by_task_short"]["MWP"] == by_task["math word problem"]
    assert set(result["by_task_short"]) == {"FQA", "MWP", "GPS", "VQA"}
    # sorted by accuracy, highest first, like the official score file
    accuracies = [v["accuracy"] for v in by_task.values()]
    assert accuracies == sorted(accuracies, reverse=True)

    # an item counts once for each of its skills
    skills = result["by_skill"]
    assert skills["arithmetic reasoning"] == {"accuracy": 0.5, "n": 4, "correct": 2}
    assert skills["algebraic reasoning"] == {"accuracy": 0.0, "n": 1, "correct": 0}
    assert skills["geometry reasoning"]["correct"] == 1
    assert result["by_grade"]["elementary school"]["n"] == 1
    assert result["by_question_type"]["multi_choice"]["n"] == 1
    assert result["by_answer_type"]["integer"]["n"] == 3
    assert result["by_source"]["CLEVR-Math"]["n"] == 5
    assert result["by_context"]["synthetic scene"]["n"] == 5

    items = {it["pid"]: it for it in result["items"]}
    assert items["5"] == {
        "pid": "5",
        "extraction": None,
        "prediction": None,
        "answer": "9",
        "true_false": False,
        "missing": True,
    }
    assert items["3"]["prediction"] == "rectangle"
    json.dumps(result)  # the result is written as a JSON score file


def test_score_empty() -> None:
    assert score_mathvista({}, {})["accuracy"] == 0.0


def test_load_problems_dict_and_list(tmp_path: Path) -> None:
    p = _problem("7", "3")
    as_dict = tmp_path / "testmini.json"
    as_dict.write_text(json.dumps({"7": p}))
    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps([p]))
    assert load_mathvista_problems(as_dict) == load_mathvista_problems(as_list) == {"7": p}


def test_load_problems_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "1": {\n')
    with pytest.raises(ScoreInputError, match=r"bad\.json: line \d+: invalid JSON"):
        load_mathvista_problems(bad)
    record = _problem("1", "3")
    del record["answer_type"]
    bad.write_text(json.dumps([record]))
    with pytest.raises(ScoreInputError, match=r"bad\.json: record 0: missing field 'answer_type'"):
        load_mathvista_problems(bad)
    with pytest.raises(ScoreInputError, match="nope.json"):
        load_mathvista_problems(tmp_path / "nope.json")


def test_load_responses(tmp_path: Path) -> None:
    path = tmp_path / "responses.jsonl"
    path.write_text('{"pid": "1", "response": "# Answer\\n\\n3"}\n\n{"pid": 2, "response": "x"}\n')
    assert load_responses_jsonl(path) == {"1": "# Answer\n\n3", "2": "x"}


@pytest.mark.parametrize(
    ("second_line", "message"),
    [
        ('{"pid": "2"}', r"line 2: field 'response'"),
        ('{"response": "x"}', r"line 2: field 'pid'"),
        ('{"pid": "2", "response": 3}', r"line 2: field 'response'"),
        ('{"pid": "1", "response": "x"}', r"line 2: field 'pid': duplicate"),
        ("{not json", r"line 2: invalid JSON"),
        ("[1, 2]", r"line 2: expected a JSON object"),
    ],
)
def test_load_responses_errors(tmp_path: Path, second_line: str, message: str) -> None:
    path = tmp_path / "responses.jsonl"
    path.write_text('{"pid": "1", "response": "a"}\n' + second_line + "\n")
    with pytest.raises(ScoreInputError, match=r"responses\.jsonl: " + message):
        load_responses_jsonl(path)
