"""Training dynamics: greedy accuracy, Pass@K, Reward-Pass@K, and temperature controllers."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from evostar.records import Response, group_by_sample


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
