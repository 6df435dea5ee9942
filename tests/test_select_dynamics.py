from evostar.dynamics import accuracy, all_steps_correct_share, distinct_share, pass_at_k, reward_pass_at_k
from evostar.records import Response
from evostar.select import select


def _r(sid, text, correct, score=None, steps=None):
    return Response(sample_id=sid, text=text, correct=correct, score=score, steps_correct=steps)


RESPONSES = [
    _r("a", "x1", True, 0.9, [True, True]),
    _r("a", "x1", True, 0.9, [True, True]),  # duplicate
    _r("a", "x2", True, 0.2, [False, True]),
    _r("a", "x3", False, 0.95),
    _r("b", "y1", False, 0.5),
    _r("b", "y2", False, 0.4),
    _r("c", "z1", True, 0.3),
    _r("c", "z2", True, 0.6),
    _r("c", "z3", True, 0.1),
]


def test_select_all_dedupes_and_drops_incorrect():
    kept = select(RESPONSES, "all")
    assert [r.text for r in kept] == ["x1", "x2", "z1", "z2", "z3"]
    assert len(select(RESPONSES, "all", dedupe=False)) == 6


def test_select_top_k_ranks_by_score():
    kept = select(RESPONSES, "top_k", k=2)
    assert [r.text for r in kept] == ["x1", "x2", "z2", "z1"]


def test_select_random_k_is_seeded_subset():
    a = select(RESPONSES, "random_k", k=1, seed=1)
    b = select(RESPONSES, "random_k", k=1, seed=1)
    assert [r.text for r in a] == [r.text for r in b]
    assert {r.sample_id for r in a} == {"a", "c"} and len(a) == 2


def test_select_threshold():
    assert [r.text for r in select(RESPONSES, "threshold", threshold=0.5)] == ["x1", "z2"]


def test_dynamics():
    assert pass_at_k(RESPONSES) == 2 / 3
    # Reward-Pass@2: prompt a's top-2 by score are x3 (wrong) and x1 (right) -> hit; b none; c hit.
    assert reward_pass_at_k(RESPONSES, k=2) == 2 / 3
    # Top-1 of a is the wrong x3.
    assert reward_pass_at_k(RESPONSES, k=1) == 1 / 3
    assert accuracy([RESPONSES[0], RESPONSES[3]]) == 0.5
    assert all_steps_correct_share(RESPONSES) == 2 / 3
    assert 0 < distinct_share(RESPONSES) < 1
