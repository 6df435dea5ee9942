"""From step scores to a response score (each aggregation) and from scores to the SFT targets
(each selection rule)."""

from __future__ import annotations

import math

import pytest

from evostar.errors import UserError
from evostar.records import Response
from evostar.reward.prm.score import AGGREGATES, aggregate_scores
from evostar.select import STRATEGIES, select

STEPS, ANSWER = [0.9, 0.4, 0.8], 0.6


@pytest.mark.parametrize(
    "how, with_answer, without_answer",
    [
        ("min", 0.4, 0.4),
        ("mean", (0.9 + 0.4 + 0.8 + 0.6) / 4, (0.9 + 0.4 + 0.8) / 3),
        ("last", 0.6, 0.8),
        ("product", 0.9 * 0.4 * 0.8 * 0.6, 0.9 * 0.4 * 0.8),
    ],
)
def test_each_aggregation(how, with_answer, without_answer):
    assert aggregate_scores(STEPS, ANSWER, how) == pytest.approx(with_answer)
    assert aggregate_scores(STEPS, ANSWER, how, include_answer=False) == pytest.approx(without_answer)
    assert aggregate_scores(STEPS, None, how) == pytest.approx(without_answer)  # no answer block
    assert aggregate_scores([], 0.7, how) == pytest.approx(0.7)  # an answer block and no steps
    assert aggregate_scores([], None, how) is None  # nothing to score: ranks last


def test_every_aggregation_is_tested_and_a_bad_one_refused():
    assert set(AGGREGATES) == {"min", "mean", "last", "product"}
    with pytest.raises(UserError, match="aggregate='max'"):
        aggregate_scores(STEPS, ANSWER, "max")


def _r(sid: str, text: str, correct: bool, score: float | None) -> Response:
    return Response(sample_id=sid, text=text, correct=correct, score=score)


GROUP = [
    _r("p", "a", True, 0.30),
    _r("p", "b", True, 0.80),
    _r("p", "b", True, 0.80),  # a duplicate of b
    _r("p", "c", False, 0.99),  # wrong: never selected, whatever its score
    _r("p", "d", True, None),  # unscored
    _r("p", "e", True, 0.55),
    _r("p", "f", True, math.nan),  # a broken score ranks like a missing one
    _r("q", "x", True, 0.20),
    _r("q", "y", True, 0.40),
    _r("r", "z", False, 0.90),  # no correct response: nothing kept
]


def texts(kept: list[Response]) -> list[str]:
    return [r.text for r in kept]


def test_all_keeps_every_correct_response_in_sampling_order():
    assert texts(select(GROUP, "all")) == ["a", "b", "d", "e", "f", "x", "y"]
    assert texts(select(GROUP, "all", dedupe=False)) == ["a", "b", "b", "d", "e", "f", "x", "y"]


def test_top_k_takes_the_highest_scores_per_prompt():
    assert texts(select(GROUP, "top_k", k=2)) == ["b", "e", "y", "x"]
    assert texts(select(GROUP, "top_k", k=1)) == ["b", "y"]
    # unscored and NaN responses come last, in sampling order; k beyond the group keeps it all
    assert texts(select(GROUP, "top_k", k=10)) == ["b", "e", "a", "d", "f", "y", "x"]
    assert texts(select(GROUP, "top_k", k=2, dedupe=False)) == ["b", "b", "y", "x"]


def test_top_k_ties_keep_sampling_order():
    tied = [_r("p", t, True, 0.5) for t in "uvw"]
    assert texts(select(tied, "top_k", k=2)) == ["u", "v"]


def test_threshold_keeps_scores_strictly_above_it():
    assert texts(select(GROUP, "threshold", threshold=0.5)) == ["b", "e"]
    assert texts(select(GROUP, "threshold", threshold=0.3)) == ["b", "e", "y"]  # 0.30 is not above 0.3
    assert texts(select(GROUP, "threshold", threshold=0.0)) == ["a", "b", "e", "x", "y"]  # no unscored, no NaN
    assert select(GROUP, "threshold", threshold=0.99) == []


def test_random_k_ignores_scores_and_is_seeded():
    picks = {tuple(texts(select(GROUP, "random_k", k=2, seed=s))) for s in range(20)}
    assert len(picks) > 1  # the seed changes the draw
    for pick in picks:
        p, q = pick[:2], pick[2:]
        assert set(p) <= {"a", "b", "d", "e", "f"} and len(set(p)) == 2 and set(q) == {"x", "y"}
        assert list(p) == sorted(p)  # kept in sampling order
    assert select(GROUP, "random_k", k=2, seed=3) == select(GROUP, "random_k", k=2, seed=3)


def test_every_selection_rule_is_tested():
    assert set(STRATEGIES) == {"all", "random_k", "top_k", "threshold"}
    with pytest.raises(ValueError, match="selection 'best'"):
        select(GROUP, "best")  # type: ignore[arg-type]
