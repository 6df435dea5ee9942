"""Evaluation: score responses (answer match + the gym's process ground truth) and accuracy."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from evostar.config import GenerationConfig
from evostar.dynamics import accuracy, all_steps_correct_share
from evostar.models.inputs import VLMInputs
from evostar.records import Response, Sample
from evostar.reward.answer import reward_responses
from evostar.rollout.hf import generate


def step_truth(sample: Sample, text: str) -> list[bool] | None:
    """Per step of `text`, is it right by the gym's checker; None for data without step truth."""
    from evostar.data.gym import check_steps

    return check_steps(sample, text) if "gym" in sample.meta else None


def score(samples: Sequence[Sample], responses: list[Response]) -> list[Response]:
    """Fill `extracted`/`correct`, and `steps_correct` where the gym knows the truth."""
    by_id = {s.id: s for s in samples}
    reward_responses(by_id, responses)
    for r in responses:
        truth = step_truth(by_id[r.sample_id], r.text)
        if truth is not None:
            r.steps_correct = truth
    return responses


def evaluate(
    model: torch.nn.Module,
    io: VLMInputs,
    samples: Sequence[Sample],
    gen: GenerationConfig,
    *,
    desc: str = "eval",
    progress: bool = True,
) -> tuple[dict[str, float | int | None], list[Response]]:
    """Greedy accuracy, and the share of correct answers whose steps are all correct."""
    responses = generate(
        model,
        io,
        samples,
        temperature=0.0,
        max_new_tokens=gen.max_new_tokens,
        batch_size=gen.eval_batch_size,
        desc=desc,
        progress=progress,
    )
    score(samples, responses)
    return {
        "accuracy": accuracy(responses),
        "steps_all_correct": all_steps_correct_share(responses),
        "n": len(samples),
    }, responses
