"""Scoring responses with the PRM: a score per step, one for the answer block, and their
aggregate as the response's ranking score.

`Response.step_scores` holds one score per step of `split_steps(text)`, aligned with
`steps_correct`; the answer block's score is kept apart in `Response.answer_score` (None when the
response has no `# Answer` block). `Response.score` aggregates the step scores and, with
`include_answer` (default), the answer block's score: ``min`` (the weakest step, the paper's
choice), ``mean``, ``last`` (the answer block's score when counted and present, else the last
step's) or ``product``. A response with neither steps nor an answer block (an empty text) gets
`step_scores == []` and `score = None`, which every ranking puts last; one with an answer block
but no steps is scored on the block alone.

With `autocast="bf16"` the forward passes run under bf16 autocast (the weights stay as they
are): on CPUs with bf16 matrix units and on recent GPUs several times faster, and the scores
move by bf16 rounding of the logits, so near-ties between responses may swap.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Sequence

from tqdm.auto import tqdm

from evostar.config import PRMAggregate
from evostar.errors import UserError
from evostar.records import Response, Sample
from evostar.reward.prm.model import PRM
from evostar.train.sft import autocast_context

__all__ = ["AGGREGATES", "aggregate_scores", "score_responses"]

AGGREGATES: tuple[str, ...] = typing.get_args(PRMAggregate)


def aggregate_scores(
    step_scores: Sequence[float], answer_score: float | None = None, how: str = "min", include_answer: bool = True
) -> float | None:
    """The response score from its segment scores; None when there is nothing to aggregate."""
    if how not in AGGREGATES:
        raise UserError(f"aggregate={how!r}: choose one of {list(AGGREGATES)}")
    values = list(step_scores)
    if include_answer and answer_score is not None:
        values.append(answer_score)
    if not values:
        return None
    if how == "min":
        return min(values)
    if how == "mean":
        return sum(values) / len(values)
    if how == "last":
        return values[-1]
    return math.prod(values)


def score_responses(
    prm: PRM,
    samples: Sequence[Sample],
    responses: Sequence[Response],
    *,
    aggregate: str = "min",
    include_answer: bool = True,
    batch_size: int = 32,
    autocast: str = "",
    progress: bool = False,
) -> list[Response]:
    """Fill `step_scores`, `answer_score` and `score` of each response in place; return them."""
    aggregate_scores([], None, aggregate)  # refuse a bad choice before any compute
    if batch_size < 1:
        raise UserError(f"batch_size={batch_size}: must be >= 1")
    if autocast not in ("", "bf16"):
        raise UserError(f"autocast={autocast!r}: choose '' (off) or bf16")
    by_id = {s.id: s for s in samples}
    for k, r in enumerate(responses):
        if r.sample_id not in by_id:
            raise UserError(f"response {k}: sample_id {r.sample_id!r} is not among the {len(by_id)} samples given")
    order = sorted(range(len(responses)), key=lambda i: len(responses[i].text))  # less padding
    bar = tqdm(total=len(responses), desc="prm score", unit="resp", disable=not progress, leave=False)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        with autocast_context(autocast, prm.device):
            scored = prm.score([by_id[responses[i].sample_id] for i in idx], [responses[i].text for i in idx])
        for i, (steps, answer) in zip(idx, scored, strict=True):
            r = responses[i]
            r.step_scores, r.answer_score = steps, answer
            r.score = aggregate_scores(steps, answer, aggregate, include_answer)
        bar.update(len(idx))
    bar.close()
    return list(responses)
