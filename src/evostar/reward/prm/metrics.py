"""How good is a PRM: against the gym's step truth, and as a verifier or reranker.

- `step_auroc`: AUROC of step scores against the true step labels (`Response.steps_correct`), the
  threshold-free measure the gym allows since every step's truth is known.
- `first_error_f1`: ProcessBench's F1, the harmonic mean of the exact first-error accuracy on
  responses with a wrong step and the accuracy on responses whose steps are all right; the
  predicted first error is the first step scoring below `threshold` (0.5: where P(+) < P(-)).
- `reward_pass_at_k`: a correct response among the PRM's top-k of a prompt's K samples.
- `selection_accuracy`: best-of-N by score, majority vote and score-weighted vote, for N in
  1, 2, 4, 8, 16.
- `label_quality`: the Monte-Carlo labels themselves against step truth. A PRM learns its
  labels, so their agreement with the truth is what it can reach at best.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from evostar.dynamics import reward_pass_at_k
from evostar.records import Response, group_by_sample
from evostar.reward.answer import extract_answer

if TYPE_CHECKING:
    from evostar.reward.prm.labels import StepLabels

__all__ = [
    "auroc",
    "first_error",
    "first_error_f1",
    "label_quality",
    "reward_pass_at_k",
    "selection_accuracy",
    "step_auroc",
]


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Probability that a random positive outscores a random negative (ties count half): the
    Mann-Whitney statistic. None when either class is absent."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    if s.shape != y.shape:
        raise ValueError(f"auroc: {s.size} scores for {y.size} labels")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    mid_rank = np.cumsum(counts) - (counts - 1) / 2  # 1-based average rank of each distinct score
    ranks = mid_rank[inverse]
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _judged(responses: Sequence[Response]) -> list[Response]:
    """Responses with both step scores and step truth, checked to be aligned."""
    out = []
    for r in responses:
        if r.step_scores is None or r.steps_correct is None:
            continue
        if len(r.step_scores) != len(r.steps_correct):
            raise ValueError(
                f"response to {r.sample_id!r}: {len(r.step_scores)} step scores for {len(r.steps_correct)} steps"
            )
        out.append(r)
    return out


def step_auroc(responses: Sequence[Response]) -> float | None:
    """AUROC of every step score against its step's truth, over all responses that have both."""
    judged = _judged(responses)
    scores = [s for r in judged for s in r.step_scores]
    labels = [c for r in judged for c in r.steps_correct]
    return auroc(scores, labels)


def first_error(steps_ok: Sequence[bool]) -> int | None:
    """Index of the first false entry; None when all are true."""
    return next((k for k, ok in enumerate(steps_ok) if not ok), None)


def first_error_f1(responses: Sequence[Response], threshold: float = 0.5) -> dict[str, float | int | None]:
    """ProcessBench's F1 over responses with step scores and step truth (empty ones skipped).

    `error_acc`: share of responses with a wrong step whose predicted first error is exactly the
    true one; `correct_acc`: share of all-correct responses with no step below `threshold`.
    Either is None when its group is empty, and then so is `f1`.
    """
    hits: dict[bool, list[bool]] = {True: [], False: []}  # keyed by "has a wrong step"
    for r in _judged(responses):
        if not r.steps_correct:
            continue
        truth = first_error(r.steps_correct)
        predicted = first_error([s >= threshold for s in r.step_scores])
        hits[truth is not None].append(predicted == truth)
    error_acc = float(np.mean(hits[True])) if hits[True] else None
    correct_acc = float(np.mean(hits[False])) if hits[False] else None
    f1 = None
    if error_acc is not None and correct_acc is not None:
        f1 = 2 * error_acc * correct_acc / (error_acc + correct_acc) if error_acc + correct_acc > 0 else 0.0
    return {
        "error_acc": error_acc,
        "correct_acc": correct_acc,
        "f1": f1,
        "n_error": len(hits[True]),
        "n_correct": len(hits[False]),
    }


def _answer_key(r: Response) -> tuple | None:
    """What a response votes for: every correct response for the gold answer (they all match it,
    whatever their surface form), a wrong one for its extracted answer; None abstains."""
    if r.correct is None:
        raise ValueError(f"response to {r.sample_id!r} has no correctness: run reward_responses first")
    if r.correct:
        return ("gold",)
    answer = r.extracted if r.extracted is not None else extract_answer(r.text)
    return None if answer is None else ("wrong", answer)


def _score(r: Response) -> float | None:
    """The response's score, None when it has none or a NaN one (a diverged PRM)."""
    return None if r.score is None or np.isnan(r.score) else float(r.score)


def _vote(group: Sequence[Response], weighted: bool) -> bool:
    """Is the answer with the most votes (or score mass) correct? Ties: the first answer seen."""
    tally: dict[tuple, float] = {}
    for r in group:
        key = _answer_key(r)
        if key is not None:
            tally[key] = tally.get(key, 0.0) + ((_score(r) or 0.0) if weighted else 1.0)
    if not tally:
        return False
    return max(tally, key=tally.__getitem__) == ("gold",)  # max keeps the first of equals


def _best(group: Sequence[Response]) -> bool:
    """Is the highest-scoring response correct? Unscored ones rank last, ties go to the first."""
    return bool(max(group, key=lambda r: -np.inf if _score(r) is None else _score(r)).correct)


def selection_accuracy(
    responses: Sequence[Response], ks: Sequence[int] = (1, 2, 4, 8, 16)
) -> dict[str, dict[int, float]]:
    """Accuracy of picking one answer from N samples, per N: by best PRM score (`best_of_n`),
    by majority vote (`majority`) and by score-weighted vote (`weighted`).

    Each prompt's samples, in sampling order, are cut into consecutive groups of N (all of them
    count, not just the first N); a prompt's value is the mean over its groups, the result the
    mean over prompts. Only N up to the smallest prompt's sample count are reported.
    """
    groups = list(group_by_sample(responses).values())
    out: dict[str, dict[int, float]] = {"best_of_n": {}, "majority": {}, "weighted": {}}
    if not groups:
        return out
    smallest = min(len(g) for g in groups)
    for k in ks:
        if k < 1 or k > smallest:
            continue
        per_prompt: dict[str, list[float]] = {name: [] for name in out}
        for g in groups:
            windows = [g[i : i + k] for i in range(0, len(g) - k + 1, k)]
            per_prompt["best_of_n"].append(float(np.mean([_best(w) for w in windows])))
            per_prompt["majority"].append(float(np.mean([_vote(w, weighted=False) for w in windows])))
            per_prompt["weighted"].append(float(np.mean([_vote(w, weighted=True) for w in windows])))
        for name, values in per_prompt.items():
            out[name][k] = float(np.mean(values))
    return out


def label_quality(labels: Sequence[StepLabels], truth: Sequence[Sequence[bool] | None]) -> dict[str, Any] | None:
    """Monte-Carlo step labels against step truth (`truth[i]`: one bool per step of `labels[i]`,
    None where it is unknown); None when no response has truth.

    Monte-Carlo labels measure whether the completer can still finish from a prefix, not whether
    the step is right: a right step is labelled negative when every completion then fails, and
    a wrong step positive when one reaches the answer anyway. Reported over all labelled steps:
    the AUROC of the hard and soft labels against the truth, and the share labelled positive
    among right and among wrong steps; and the same share for the wrong steps of responses whose
    final answer is right, the ones PRM top-k selection must rank below their siblings.
    """
    if len(labels) != len(truth):
        raise ValueError(f"label_quality: {len(truth)} truths for {len(labels)} labelled responses")
    hard: list[bool] = []
    soft: list[float] = []
    right: list[bool] = []
    in_correct: list[bool] = []
    for k, (lab, ok) in enumerate(zip(labels, truth, strict=True)):
        if ok is None:
            continue
        if len(ok) != len(lab.hard):
            raise ValueError(f"label_quality: response {k} has {len(lab.hard)} labels for {len(ok)} steps of truth")
        hard += lab.hard
        soft += lab.soft
        right += list(ok)
        in_correct += [lab.correct] * len(ok)
    if not right:
        return None
    h, y, c = np.asarray(hard, dtype=bool), np.asarray(right, dtype=bool), np.asarray(in_correct, dtype=bool)

    def share(mask: np.ndarray) -> float | None:
        return float(h[mask].mean()) if mask.any() else None

    return {
        "steps": int(y.size),
        "right_share": float(y.mean()),
        "hard_auroc": auroc(h.astype(float).tolist(), right),
        "soft_auroc": auroc(soft, right),
        "positive_if_right": share(y),
        "positive_if_wrong": share(~y),
        "wrong_steps_of_correct_responses": int((~y & c).sum()),
        "positive_if_wrong_in_correct": share(~y & c),
    }
