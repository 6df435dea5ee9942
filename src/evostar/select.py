"""Selection: which correct responses of each prompt become SFT targets.

The paper's finding: among the correct responses, keep the top-2 by process-reward score
(`top_k`); threshold filtering tends to keep all or none of a prompt's responses. The choices
are declared once, as `evostar.config.Selection`.
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Sequence

import numpy as np

from evostar.config import Selection
from evostar.records import Response, group_by_sample

STRATEGIES: tuple[str, ...] = typing.get_args(Selection)


def _by_score(r: Response) -> float:
    """Sort key: highest score first; responses without a score (or a NaN one) rank last."""
    return -(r.score if r.score is not None and not np.isnan(r.score) else -np.inf)


def _all(correct: list[Response], k: int, threshold: float, rng: np.random.Generator) -> list[Response]:
    return correct


def _random_k(correct: list[Response], k: int, threshold: float, rng: np.random.Generator) -> list[Response]:
    idx = rng.permutation(len(correct))[:k]
    return [correct[i] for i in sorted(idx)]


def _top_k(correct: list[Response], k: int, threshold: float, rng: np.random.Generator) -> list[Response]:
    return sorted(correct, key=_by_score)[:k]


def _threshold(correct: list[Response], k: int, threshold: float, rng: np.random.Generator) -> list[Response]:
    return [r for r in correct if r.score is not None and r.score > threshold]


_PICK: dict[str, Callable[..., list[Response]]] = {
    "all": _all,
    "random_k": _random_k,
    "top_k": _top_k,
    "threshold": _threshold,
}
assert tuple(_PICK) == STRATEGIES, "every evostar.config.Selection needs its function here"


def select(
    responses: Sequence[Response],
    strategy: Selection = "all",
    k: int = 2,
    threshold: float = 0.5,
    dedupe: bool = True,
    seed: int = 0,
) -> list[Response]:
    """Correct responses kept per prompt, in a deterministic order.

    `top_k` and `threshold` rank by `Response.score` (filled by a reward model); responses
    without a score rank last.
    """
    pick = _PICK.get(strategy)
    if pick is None:
        raise ValueError(f"selection {strategy!r}: choose one of {list(STRATEGIES)}")
    rng = np.random.default_rng(seed)
    kept: list[Response] = []
    for group in group_by_sample(responses).values():
        correct = [r for r in group if r.correct]
        if dedupe:  # the first of each distinct text, in sampling order
            firsts: dict[str, Response] = {}
            for r in correct:
                firsts.setdefault(r.text, r)
            correct = list(firsts.values())
        if correct:
            kept += pick(correct, k, threshold, rng)
    return kept
