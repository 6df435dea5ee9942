"""Training dynamics: greedy accuracy, Pass@K, Reward-Pass@K, and temperature controllers."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from evostar.records import Response, group_by_sample, split_steps


def accuracy(responses: Sequence[Response]) -> float:
    """Share of responses whose final answer is correct (one greedy response per prompt)."""
    return float(np.mean([bool(r.correct) for r in responses])) if responses else 0.0


def pass_at_k(responses: Sequence[Response]) -> float:
    """Share of prompts with at least one correct response among their K samples."""
    groups = group_by_sample(responses)
    return float(np.mean([any(r.correct for r in g) for g in groups.values()])) if groups else 0.0


def reward_pass_at_k(responses: Sequence[Response], k: int = 2) -> float:
    """Share of prompts where a correct response is among the reward model's top-k of all K."""
    groups = group_by_sample(responses)
    hits = []
    for g in groups.values():
        ranked = sorted(g, key=lambda r: -(r.score if r.score is not None else -np.inf))
        hits.append(any(r.correct for r in ranked[:k]))
    return float(np.mean(hits)) if hits else 0.0


def all_steps_correct_share(responses: Sequence[Response]) -> float | None:
    """Among correct responses with process ground truth, the share whose every step is right."""
    known = [r for r in responses if r.correct and r.steps_correct is not None]
    if not known:
        return None
    return float(np.mean([bool(r.all_steps_correct) for r in known]))


def distinct_share(responses: Sequence[Response]) -> float:
    """Distinct responses per prompt over K (1.0: all different) -- a cheap diversity signal."""
    groups = group_by_sample(responses)
    if not groups:
        return 0.0
    return float(np.mean([len({r.text for r in g}) / len(g) for g in groups.values()]))


def balance_score(responses: Sequence[Response], n_star: int = 4, threshold: float | None = None) -> float:
    """B-STaR's balance score: the mean over prompts of min(c / n*, 1) * c / n, where n counts a
    prompt's selected responses (score above `threshold`; all of them when None) and c the
    distinct correct ones among them: enough correct samples (exploration) and a selection that
    is mostly correct (exploitation). A prompt with nothing selected scores 0."""
    groups = group_by_sample(responses)
    values = []
    for g in groups.values():
        picked = [r for r in g if threshold is None or (r.score is not None and r.score > threshold)]
        c = len({r.text for r in picked if r.correct})
        values.append(min(c / n_star, 1.0) * c / len(picked) if picked else 0.0)
    return float(np.mean(values)) if values else 0.0


def mean_steps(responses: Sequence[Response]) -> float | None:
    """Mean number of reasoning steps (paragraphs before `# Answer`) per response."""
    return float(np.mean([len(split_steps(r.text)) for r in responses])) if responses else None


def candidate_metrics(
    responses: Sequence[Response], reward_k: int = 2, n_star: int = 4, threshold: float | None = None
) -> dict[str, float | None]:
    """What one candidate temperature's samples are worth: by each controller's measure."""
    scored = any(r.score is not None for r in responses)
    return {
        "accuracy": accuracy(responses),
        "pass_at_k": pass_at_k(responses),
        "reward_pass_at_k": reward_pass_at_k(responses, reward_k) if scored else None,
        "balance": balance_score(responses, n_star, threshold if scored else None),
        "distinct_share": distinct_share(responses),
    }


CONTROLLER_METRIC = {"reward_pass": "reward_pass_at_k", "pass_at_k": "pass_at_k", "balance": "balance"}
"""The `candidate_metrics` key each adaptive controller maximises."""


def choose_temperature(curve: dict[float, dict[str, float | None]], controller: str, current: float) -> float:
    """The candidate with the best value of the controller's measure; among equals, the one
    nearest the temperature in use (no change without a reason), then the lower one."""
    key = CONTROLLER_METRIC[controller]
    values = {t: m[key] for t, m in curve.items() if m.get(key) is not None}
    if not values:
        raise ValueError(f"controller {controller!r}: no candidate has a {key} value")
    best = max(values.values())
    return min((t for t, v in values.items() if v == best), key=lambda t: (abs(t - current), t))
