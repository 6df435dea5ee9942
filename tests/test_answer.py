"""Final-answer extraction and matching (the outcome reward)."""

from __future__ import annotations

import pytest

from evostar.records import Response, Sample, format_response
from evostar.reward import answers_match, extract_answer, reward_responses

CHOICES = ["3 cm", "4 cm", "5 cm", "6 cm"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (format_response("Step 1.\n\nStep 2.", "12"), "12"),
        ("Reasoning.\n\n# Answer\n\n12.", "12"),
        ("# Answer\n\n3.5", "3.5"),
        ("# Answer\n\n\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("# Answer\n\n$\\sqrt{2}$", "\\sqrt{2}"),
        ("# Answer\n\nThe answer is (B).", "(B)"),
        ("# Answer\n\nWrong format\n\n# Answer\n\n7\n\nextra junk", "7"),  # the last marker wins
        ("So the result is \\boxed{3\\sqrt{2}} units.", "3\\sqrt{2}"),
        ("\\boxed{1} then \\boxed{\\frac{2}{3}}", "\\frac{2}{3}"),
        ("Thus the final answer is 7. Done.", "7"),
        ("I guess the answer is B", "B"),
    ],
)
def test_extract_answer(text: str, expected: str) -> None:
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "text", ["", "no answer anywhere", "# Answer\n\n", "# Answer", "truncated \\boxed{\\frac{1}{2"]
)
def test_extract_answer_none(text: str) -> None:
    assert extract_answer(text) is None


@pytest.mark.parametrize("pred", ["B", "(B)", "B.", "B)", "\\boxed{B}", "Option B", "(B) 4 cm", "4 cm", " 4  CM "])
@pytest.mark.parametrize("gold", ["B", "4 cm"])
def test_multiple_choice_forms(pred: str, gold: str) -> None:
    assert answers_match(pred, gold, CHOICES)


@pytest.mark.parametrize("pred", ["A", "(C)", "6 cm", "E", "7 cm", "", "four", None])
def test_multiple_choice_wrong(pred: str | None) -> None:
    assert not answers_match(pred, "B", CHOICES)


def test_multiple_choice_numeric_options() -> None:
    assert answers_match("4.0", "A", ["4", "5"])
    assert answers_match("5", "5", ["4", "5"])
    assert not answers_match("4", "B", ["4", "5"])


@pytest.mark.parametrize(
    ("pred", "gold"),
    [
        ("12", "12"),
        ("12.0", "12"),
        ("-3", "-3.00"),
        ("1,000", "1000"),
        ("50%", "50"),
        ("50\\%", "0.5"),
        ("\\frac{1}{2}", "0.5"),
        ("0.5", "1/2"),
        ("\\dfrac{3}{4}", "0.75"),
        ("\\sqrt{12}", "2\\sqrt{3}"),
        ("x = 3", "3"),
        ("12 apples", "12"),
        ("$12$", "12"),
        ("Paris", "paris"),
    ],
)
def test_equivalent(pred: str, gold: str) -> None:
    assert answers_match(pred, gold)


@pytest.mark.parametrize(
    ("pred", "gold"),
    [
        ("371", "372"),
        ("0.33", "\\frac{1}{3}"),
        ("13", "12"),
        ("gabrage", "garbage"),  # as symbols these would be equal products
        ("seven", "7"),
        ("", "1"),
        (None, "1"),
        ("\\frac{1}{", "1"),
        ("}}}{{\\\\", "1"),
        ("\\sqrt{\\sqrt{\\sqrt{", "2"),
        ("lorem ipsum " * 50, "3"),
    ],
)
def test_not_equivalent(pred: str | None, gold: str) -> None:
    assert answers_match(pred, gold) is False


def test_reward_responses_fills_fields() -> None:
    samples = {
        "a": Sample(id="a", question="q", answer="12"),
        "b": Sample(id="b", question="q", answer="4 cm", choices=CHOICES),
        "u": Sample(id="u", question="unlabeled"),
    }
    responses = [
        Response("a", format_response("s", "12.0")),
        Response("a", format_response("s", "13")),
        Response("a", "no marker at all"),
        Response("b", format_response("s", "(B)")),
        Response("u", format_response("s", "5")),
    ]
    out = reward_responses(samples, responses)
    assert out[0] is responses[0]
    assert [r.extracted for r in out] == ["12.0", "13", None, "(B)", "5"]
    assert [r.correct for r in out] == [True, False, False, True, None]


def test_reward_responses_unknown_sample() -> None:
    with pytest.raises(KeyError, match="nope"):
        reward_responses({}, [Response("nope", "x")])


def test_math_verify_in_worker_thread() -> None:
    """math-verify's SIGALRM timeouts only work in the main thread; workers must still verify."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1) as pool:
        assert pool.submit(answers_match, "\\frac{3}{8}", "0.375").result() is True
        assert pool.submit(answers_match, "\\frac{3}{7}", "0.375").result() is False
