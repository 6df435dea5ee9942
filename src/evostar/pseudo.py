"""Pseudo-labels for unlabeled prompts: the answer a prompt's own K samples agree on.

M-STaR Table 3: unlabeled prompts, labelled by majority or PRM-weighted vote over their samples,
mixed into the loop after some share of training; with their true answers (the oracle) as the
skyline. Answers are grouped with the same matcher that rewards responses, so `B`, `(B)` and
`the second digit` of a multiple-choice question count as one vote.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from evostar.records import Response, Sample, group_by_sample
from evostar.reward.answer import answers_match, extract_answer

__all__ = ["pseudo_label", "pseudo_labelled"]


def pseudo_label(sample: Sample, responses: Sequence[Response], weighted: bool = False) -> str | None:
    """The answer with the most votes among `responses` (or, `weighted`, the largest summed
    score); ties go to the answer seen first. None when no response has an answer."""
    groups: list[tuple[str, float]] = []  # (representative answer, votes)
    for r in responses:
        answer = r.extracted if r.extracted is not None else extract_answer(r.text)
        if answer is None:
            continue
        vote = (0.0 if r.score is None or np.isnan(r.score) else float(r.score)) if weighted else 1.0
        for k, (rep, votes) in enumerate(groups):
            if answers_match(answer, rep, sample.choices):
                groups[k] = (rep, votes + vote)
                break
        else:
            groups.append((answer, vote))
    if not groups:
        return None
    return max(groups, key=lambda g: g[1])[0]  # max keeps the first of equals


def pseudo_labelled(
    samples: Sequence[Sample], responses: Sequence[Response], mode: str
) -> tuple[list[Sample], dict[str, float | int | None]]:
    """`samples` with the answer the loop trains them towards (`mode`: majority, prm_weighted or
    oracle; prompts without one dropped), and how good the labels were where the truth is known."""
    if mode not in ("majority", "prm_weighted", "oracle"):
        raise ValueError(f"pseudo-label mode {mode!r}: choose majority, prm_weighted or oracle")
    by_prompt = group_by_sample(responses)
    out, hits = [], []
    for s in samples:
        truth = s.answer
        label = truth if mode == "oracle" else pseudo_label(s, by_prompt.get(s.id, []), mode == "prm_weighted")
        if label is None:
            continue
        if truth is not None:
            hits.append(answers_match(label, truth, s.choices))
        out.append(dataclasses.replace(s, answer=label))
    return out, {
        "unlabeled_prompts": len(samples),
        "pseudo_labelled": len(out),
        "pseudo_label_accuracy": float(np.mean(hits)) if hits else None,
    }
