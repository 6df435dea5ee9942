"""What a PRM is measured against: step scorers that need no PRM.

- "every step is right": every step scores 1, so no first error is ever predicted. Its
  first-error F1 is 0 whenever some response has a wrong step; its AUROC is 0.5.
- the policy's own confidence: a step's score is the geometric mean of the policy's token
  probabilities over the step's tokens, exp(mean log-prob). Its first-error F1 needs a
  threshold, and there is no natural one, so `best_threshold_f1` picks the one that maximises
  F1 on the responses it is scored on: that favours the baseline, never the PRM.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from evostar.models.inputs import VLMInputs
from evostar.records import STEP_SEPARATOR, Response, Sample, split_steps
from evostar.reward.prm.metrics import first_error_f1, step_auroc

__all__ = ["baseline_measures", "best_threshold_f1", "policy_step_scores"]


def _step_spans(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of the response's steps joined by the separator (as the PRM renders them, no
    tags), and each step's [start, end) token span."""
    sep = tokenizer(STEP_SEPARATOR, add_special_tokens=False)["input_ids"]
    ids: list[int] = []
    spans = []
    for k, step in enumerate(split_steps(text)):
        if k:
            ids += sep
        start = len(ids)
        ids += tokenizer(step, add_special_tokens=False)["input_ids"]
        spans.append((start, len(ids)))
    return ids, spans


@torch.inference_mode()
def policy_step_scores(
    model: torch.nn.Module,
    io: VLMInputs,
    samples: Sequence[Sample],
    responses: Sequence[Response],
    batch_size: int = 16,
    progress: bool = False,
) -> list[list[float]]:
    """Per response, exp(mean token log-prob) of each of its steps under `model`."""
    by_id = {s.id: s for s in samples}
    model.eval()
    device = next(model.parameters()).device
    out: list[list[float]] = []
    starts = range(0, len(responses), batch_size)
    for b in tqdm(starts, desc="policy step scores", disable=not progress):
        chunk = responses[b : b + batch_size]
        rows = [by_id[r.sample_id] for r in chunk]
        rendered = [_step_spans(io.tokenizer, r.text) for r in chunk]
        batch = io.collate_ids(rows, [ids for ids, _ in rendered], left=False)
        batch = {k: v.to(device) for k, v in batch.items()}
        logprobs = torch.log_softmax(model(**batch).logits.float(), dim=-1)
        for row, sample, (ids, spans) in zip(range(len(chunk)), rows, rendered, strict=True):
            n_prompt = io.encode_prompt(sample)["input_ids"].shape[1]
            target = torch.tensor(ids, device=device)
            # the logits at position p predict token p + 1
            token_lp = logprobs[row, n_prompt - 1 : n_prompt - 1 + len(ids)].gather(1, target[:, None])[:, 0]
            out.append([float(token_lp[a:e].mean().exp()) if e > a else 1.0 for a, e in spans])
    return out


def best_threshold_f1(responses: Sequence[Response]) -> dict:
    """First-error F1 at the threshold (among the step scores themselves) that maximises it."""
    scores = sorted({s for r in responses if r.step_scores for s in r.step_scores})
    best = first_error_f1(responses, threshold=0.0)
    best["threshold"] = 0.0
    # thresholds just above each distinct score: a step is "wrong" when it scores below
    for t in np.unique(np.quantile(scores, np.linspace(0, 1, 101))) if scores else []:
        f1 = first_error_f1(responses, threshold=float(np.nextafter(t, np.inf)))
        if (f1["f1"] or 0.0) > (best["f1"] or 0.0):
            best = {**f1, "threshold": float(np.nextafter(t, np.inf))}
    return best


def _copy(r: Response, scores: Sequence[float]) -> Response:
    return dataclasses.replace(r, step_scores=list(scores))


def baseline_measures(
    responses: Sequence[Response], policy_scores: Sequence[Sequence[float]] | None = None
) -> dict[str, dict]:
    """Step AUROC and first-error F1 of the two baselines on `responses` (those with step truth)."""
    known = [k for k, r in enumerate(responses) if r.steps_correct is not None]
    judged = [responses[k] for k in known]
    ones = [_copy(r, [1.0] * len(r.steps_correct)) for r in judged]
    out: dict[str, dict] = {
        "every_step_right": {"step_auroc": step_auroc(ones), "first_error_f1": first_error_f1(ones)["f1"]}
    }
    if policy_scores is not None:
        scored = [_copy(responses[k], policy_scores[k]) for k in known]
        f1 = best_threshold_f1(scored)
        out["policy_logprob"] = {
            "step_auroc": step_auroc(scored),
            "first_error_f1": f1["f1"],
            "threshold": f1["threshold"],
        }
    return out
