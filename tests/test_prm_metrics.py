"""PRM metrics on hand-made numbers: AUROC, ProcessBench F1, Reward-Pass@k and selection by
best score or vote."""

from __future__ import annotations

import numpy as np
import pytest

from evostar.records import Response
from evostar.reward.prm.labels import StepLabels
from evostar.reward.prm.metrics import (
    auroc,
    first_error,
    first_error_f1,
    label_quality,
    reward_pass_at_k,
    selection_accuracy,
    step_auroc,
)


def test_auroc_on_hand_made_numbers():
    assert auroc([0.9, 0.8, 0.7, 0.6], [True, False, True, False]) == 0.75
    assert auroc([0.1, 0.2, 0.3], [False, True, True]) == 1.0
    assert auroc([0.1, 0.2, 0.3], [True, True, False]) == 0.0
    assert auroc([0.5, 0.5, 0.5, 0.9], [True, False, False, True]) == 0.75  # a tie counts half
    assert auroc([0.3, 0.4], [True, True]) is None  # one class only
    with pytest.raises(ValueError, match="2 scores for 3 labels"):
        auroc([0.1, 0.2], [True, False, True])


def test_auroc_matches_the_pairwise_definition():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 10, 200) / 10  # many ties
    labels = rng.random(200) < 0.4
    pos, neg = scores[labels], scores[~labels]
    pairwise = ((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean()
    assert auroc(scores, labels) == pytest.approx(pairwise)


def _judged(steps_correct, step_scores, sid="s"):
    return Response(sample_id=sid, text="", steps_correct=steps_correct, step_scores=step_scores)


JUDGED = [
    _judged([True, True, False, False], [0.9, 0.8, 0.3, 0.2]),  # first error 2, found
    _judged([True, False, True], [0.4, 0.3, 0.9]),  # first error 1, predicted 0
    _judged([True, True], [0.9, 0.6]),  # all right, none below 0.5
    _judged([True, True, True], [0.9, 0.45, 0.8]),  # all right, but step 1 below 0.5
    _judged([True], [0.7]),
    _judged([], []),  # no steps: skipped
    Response(sample_id="s", text="", steps_correct=[False]),  # unscored: skipped
]


def test_step_auroc_pools_every_scored_step():
    assert step_auroc(JUDGED) == 1.0  # every right step outscores every wrong one
    # adds a right step at 0.3 (ties two wrong ones, beats 0.2, loses to 0.5) and a wrong one at 0.5
    # (beaten by the eight right steps above it): 40 of 11 x 4 pairs
    assert step_auroc([*JUDGED, _judged([True, False], [0.3, 0.5])]) == pytest.approx(40 / 44)
    with pytest.raises(ValueError, match="2 step scores for 3 steps"):
        step_auroc([_judged([True, True, False], [0.1, 0.2])])


def test_processbench_f1():
    assert first_error([True, False, False]) == 1 and first_error([True]) is None
    m = first_error_f1(JUDGED)
    assert (m["n_error"], m["n_correct"]) == (2, 3)
    assert m["error_acc"] == 0.5 and m["correct_acc"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(4 / 7)
    m = first_error_f1(JUDGED, threshold=0.42)  # step 1 of the fourth is no longer an error
    assert m["correct_acc"] == 1.0 and m["error_acc"] == 0.5 and m["f1"] == pytest.approx(2 / 3)
    assert first_error_f1(JUDGED[2:5])["f1"] is None  # no wrong-process responses


def _r(sid, correct, extracted, score):
    return Response(sample_id=sid, text="", correct=correct, extracted=extracted, score=score)


VOTES = [
    _r("p", True, "23", 0.2),
    _r("p", False, "22", 0.9),
    _r("p", False, "22", 0.1),
    _r("p", True, "23.0", 0.3),  # another spelling of the gold answer votes with it
    _r("q", False, "5", 0.8),
    _r("q", False, "5", 0.7),
    _r("q", False, "5", 0.6),
    _r("q", True, "7", 0.95),
]


def test_best_of_n_and_votes_per_n():
    acc = selection_accuracy(VOTES)
    assert acc["best_of_n"] == {1: 0.375, 2: 0.5, 4: 0.5}  # 8 and 16 exceed a prompt's samples
    assert acc["majority"] == {1: 0.375, 2: 0.25, 4: 0.5}
    assert acc["weighted"] == {1: 0.375, 2: 0.5, 4: 0.0}


def test_abstaining_and_unscored_responses():
    group = [_r("p", False, None, 0.9), _r("p", True, "7", None), _r("p", False, "8", 0.1)]
    acc = selection_accuracy(group, ks=(3,))
    assert acc["best_of_n"] == {3: 0.0}  # the unscored correct one ranks last
    assert acc["majority"] == {3: 1.0}  # no answer, no vote: 7 and 8 tie, 7 came first
    assert acc["weighted"] == {3: 0.0}  # 8 carries 0.1, 7 nothing
    diverged = [_r("p", False, "8", float("nan")), _r("p", True, "7", 0.2), _r("p", False, "8", 0.1)]
    acc = selection_accuracy(diverged, ks=(3,))
    assert acc["best_of_n"] == {3: 1.0} and acc["weighted"] == {3: 1.0}  # a NaN score counts as none
    with pytest.raises(ValueError, match="no correctness"):
        selection_accuracy([_r("p", None, "7", 0.5)], ks=(1,))


def test_reward_pass_at_k():
    assert reward_pass_at_k(VOTES, k=1) == 0.5  # p's top response is wrong, q's is right
    assert reward_pass_at_k(VOTES, k=2) == 1.0


def test_baselines_every_step_right_and_best_threshold():
    from evostar.reward.prm.baselines import baseline_measures, best_threshold_f1

    def r(steps: list[bool], scores: list[float] | None = None) -> Response:
        return Response("a", "x", correct=True, steps_correct=steps, step_scores=scores)

    responses = [r([True, True]), r([True, False]), r([False, True]), r([True, True, True])]
    policy = [[0.9, 0.8], [0.9, 0.3], [0.2, 0.7], [0.6, 0.9, 0.7]]
    got = baseline_measures(responses, policy)
    # never predicting an error: all-correct responses right, wrong-process ones all missed
    assert got["every_step_right"] == {"step_auroc": 0.5, "first_error_f1": 0.0}
    # any threshold in (0.3, 0.6] finds both first errors and passes both all-correct responses
    assert got["policy_logprob"]["first_error_f1"] == 1.0
    assert 0.3 < got["policy_logprob"]["threshold"] <= 0.6
    assert got["policy_logprob"]["step_auroc"] == 1.0
    assert best_threshold_f1([r([True, False], [0.5, 0.5])])["f1"] is None  # no all-correct group


def _labels(hard: list[bool], soft: list[float], correct: bool) -> StepLabels:
    return StepLabels("s", "", hard, soft, [True] * len(hard), None, 8, correct)


def test_label_quality_against_hand_made_truth():
    labels = [
        # a wrong response: its first step is right, but every completion from it failed
        _labels([False, False, False], [0.0, 0.0, 0.0], correct=False),
        # a right answer through a wrong second step, which the completions forgave
        _labels([True, True, True], [0.5, 0.25, 1.0], correct=True),
        _labels([True, True], [1.0, 0.75], correct=True),
    ]
    truth = [[True, False, False], [True, False, True], None]  # the last response: truth unknown
    q = label_quality(labels, truth)
    assert q["steps"] == 6 and q["right_share"] == 0.5
    # hard labels: right steps positive 2 of 3, wrong steps positive 1 of 3
    assert q["positive_if_right"] == pytest.approx(2 / 3) and q["positive_if_wrong"] == pytest.approx(1 / 3)
    assert q["hard_auroc"] == auroc([0, 0, 0, 1, 1, 1], [True, False, False, True, False, True])
    assert q["soft_auroc"] == auroc([0.0, 0.0, 0.0, 0.5, 0.25, 1.0], [True, False, False, True, False, True])
    assert q["wrong_steps_of_correct_responses"] == 1 and q["positive_if_wrong_in_correct"] == 1.0
    assert label_quality(labels, [None, None, None]) is None
    with pytest.raises(ValueError, match="2 labels for 3 steps"):
        label_quality(labels[2:], [[True, True, False]])
