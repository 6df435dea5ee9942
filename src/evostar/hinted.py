"""Answer-hinted warm-up: let an instruction-tuned model write its own chains of thought.

The paper's warm-up (recipe.md section 6) for models that already follow instructions: show the
model the question, the image **and the gold answer**, ask it to explain each step (steps
separated by a blank line) and to end with ``# Answer`` and the answer; responses that reach the
gold answer become the SFT set that teaches the chain-of-thought format. No human-written
rationales are needed, only the labeled training prompts.

The hint is only ever in the *generation* prompt. What this module returns are the ORIGINAL
samples (question untouched) with ``rationale`` set to the response's steps and ``answer`` set to
the gold answer, so the SFT target is ``steps + "# Answer" + gold`` and the prompt it is trained
under carries no answer. Responses that talk about the hint ("the given answer ...") are dropped:
a model must not learn to reason from an answer it will not be shown.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from evostar.data.loaders import load_samples
from evostar.data.parse import DataError
from evostar.models.inputs import VLMInputs
from evostar.records import STEP_SEPARATOR, Response, Sample, split_steps
from evostar.reward.answer import answers_match, extract_answer
from evostar.rollout.hf import generate
from evostar.rundir import atomic_write_text, dumps, stage_seed

if TYPE_CHECKING:
    from evostar.context import RunContext

__all__ = [
    "HINT_TEMPLATE",
    "hinted_warmup_set",
    "HINTED_ID_SUFFIX",
    "REASONS",
    "build_warmup_set",
    "filter_hinted",
    "hinted_prompt",
    "leaks_hint",
    "pick_prompts",
    "warmup_records",
]

HINT_TEMPLATE = (
    "{question}\n\n"
    "The correct answer is: {answer}\n"
    "Explain how to get this answer step by step. Put each step in its own paragraph, separated "
    'by a blank line, and end with a line "# Answer" followed by the answer.'
)
"""The generation prompt: question, gold answer, and the response format of recipe.md section 3."""

HINTED_ID_SUFFIX = "::hinted"
"""Hinted prompts get their own ids: `VLMInputs` caches encoded prompts by sample id, and a hinted
encoding cached under the original id would put the answer into every later prompt."""

_LEAK = re.compile(
    r"correct answer is\s*:"  # the hint line, quoted back
    r"|\b(?:given|provided|stated|supplied|hinted)\s+(?:correct\s+)?answer\b"
    r"|\bthe\s+hint\b"
    r"|\bexplain how to get this answer\b"
    r"|\bstep by step\. put each step\b",
    re.IGNORECASE,
)

REASONS = ("wrong", "no_steps", "leaks_hint", "duplicate", "over_limit", "kept")
"""Every generated response ends in exactly one of these (so the counts add up to `generated`)."""


def _shown_answer(sample: Sample) -> str:
    """The answer as the hint shows it: "(B) option text" for multiple choice, else as is."""
    assert sample.answer is not None
    if sample.choices and len(sample.answer) == 1 and sample.answer.isalpha():
        i = ord(sample.answer.upper()) - ord("A")
        if 0 <= i < len(sample.choices):
            return f"({sample.answer.upper()}) {sample.choices[i]}"
    return sample.answer


def hinted_prompt(sample: Sample, template: str = HINT_TEMPLATE) -> Sample:
    """A copy of ``sample`` whose question carries the gold answer and the format instruction.

    Its id ends in `HINTED_ID_SUFFIX` (see there); ``meta["hinted_from"]`` is the original id.
    """
    if sample.answer is None:
        raise ValueError(f"sample {sample.id!r} has no gold answer to hint")
    question = template.format(question=sample.question, answer=_shown_answer(sample))
    meta = {**sample.meta, "hinted_from": sample.id}
    return dataclasses.replace(sample, id=sample.id + HINTED_ID_SUFFIX, question=question, rationale=None, meta=meta)


def leaks_hint(text: str) -> bool:
    """Does a response quote the hint or refer to a given answer?"""
    return _LEAK.search(text) is not None


def _rationale(text: str) -> str:
    """The steps before the first answer block, re-joined with the step separator."""
    return STEP_SEPARATOR.join(split_steps(text))


def filter_hinted(
    samples: Sequence[Sample], responses: Sequence[Response], *, keep_per_prompt: int = 1
) -> tuple[list[Sample], dict[str, int]]:
    """Warm-up samples from the responses to hinted prompts, and why each response went.

    ``samples`` are the ORIGINAL samples; ``responses`` refer to them by original id (or by
    hinted id). A response is kept when its final answer matches the gold answer, it has at
    least one step before ``# Answer``, it does not leak the hint, and it is not a copy of an
    already kept one, up to ``keep_per_prompt`` per prompt, in generation order. Each kept
    response gives a copy of its sample with ``rationale`` = the steps and ``answer`` = gold;
    the j-th extra copy of a prompt gets id ``<id>#j`` so the set can be saved and reloaded.
    Fills each response's ``extracted`` and ``correct`` in place.
    """
    by_id = {s.id: s for s in samples}
    counts = dict.fromkeys(REASONS, 0)
    kept_texts: dict[str, set[str]] = {}
    out: list[Sample] = []
    for r in responses:
        sid = r.sample_id.removesuffix(HINTED_ID_SUFFIX)
        sample = by_id[sid]
        if sample.answer is None:
            raise ValueError(f"sample {sid!r} has no gold answer: hinted responses cannot be checked")
        r.extracted = extract_answer(r.text)
        r.correct = answers_match(r.extracted, sample.answer, sample.choices)
        rationale = _rationale(r.text)
        seen = kept_texts.setdefault(sid, set())
        if not r.correct:
            reason = "wrong"
        elif not rationale:
            reason = "no_steps"
        elif leaks_hint(r.text):
            reason = "leaks_hint"
        elif rationale in seen:
            reason = "duplicate"
        elif len(seen) >= keep_per_prompt:
            reason = "over_limit"
        else:
            reason = "kept"
            new_id = sid if not seen else f"{sid}#{len(seen)}"
            meta = {**sample.meta, "warmup": {"source": "hinted", "from": sid, "temperature": r.temperature}}
            meta.pop("hinted_from", None)
            out.append(dataclasses.replace(sample, id=new_id, rationale=rationale, answer=sample.answer, meta=meta))
            seen.add(rationale)
        counts[reason] += 1
    return out, counts


def pick_prompts(samples: Sequence[Sample], max_prompts: int, seed: int) -> list[Sample]:
    """The labeled samples, or a seeded random ``max_prompts`` of them (0: all), in data order."""
    labeled = [s for s in samples if s.answer is not None]
    if max_prompts <= 0 or max_prompts >= len(labeled):
        return labeled
    chosen = np.sort(np.random.default_rng(seed).choice(len(labeled), size=max_prompts, replace=False))
    return [labeled[i] for i in chosen]


def build_warmup_set(
    model: torch.nn.Module,
    io: VLMInputs,
    samples: Sequence[Sample],
    *,
    k: int,
    temperature: float,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
    keep_per_prompt: int = 1,
    template: str = HINT_TEMPLATE,
    generate_fn: Callable[..., list[Response]] = generate,
    progress: bool = False,
) -> tuple[list[Sample], dict[str, Any]]:
    """Generate ``k`` responses per hinted prompt and keep the correct, well-formed ones.

    Returns the warm-up samples (original questions, ``rationale`` set, see `filter_hinted`)
    and stats: ``prompts``, ``skipped_unlabeled``, ``generated``, one count per reason in
    `REASONS` (summing to ``generated``), ``kept_prompts`` and ``yield`` (the share of prompts
    with a kept response). ``generate_fn`` is any rollout backend with the signature of
    `evostar.rollout.hf.generate` (vLLM, or `distributed.generate_sharded` bound to one).
    Hinted prompts are encoded by a separate `VLMInputs`, so ``io``'s prompt cache never holds one.
    """
    labeled = [s for s in samples if s.answer is not None]
    hinted = [hinted_prompt(s, template) for s in labeled]
    hint_io = VLMInputs(io.processor, io.prompt_template, io.system_prompt)
    torch.manual_seed(seed)
    responses = generate_fn(
        model,
        hint_io,
        hinted,
        k=k,
        temperature=temperature,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        iteration=0,
        desc="hinted warm-up",
        progress=progress,
    )
    for r in responses:
        r.sample_id = r.sample_id.removesuffix(HINTED_ID_SUFFIX)
    kept, counts = filter_hinted(labeled, responses, keep_per_prompt=keep_per_prompt)
    kept_prompts = len({s.meta["warmup"]["from"] for s in kept})
    stats: dict[str, Any] = {
        "prompts": len(labeled),
        "skipped_unlabeled": len(samples) - len(labeled),
        "generated": len(responses),
        **counts,
        "kept_prompts": kept_prompts,
        "yield": kept_prompts / len(labeled) if labeled else 0.0,
    }
    return kept, stats


def warmup_records(samples: Sequence[Sample]) -> list[dict[str, Any]]:
    """MathV360K-style records (what `load_samples` reads back, rationale included), so a run
    can save the generated warm-up set and resume without regenerating it."""
    records = []
    for s in samples:
        human = f"<image>\n{s.question}" if s.image else s.question
        rec: dict[str, Any] = {
            "id": s.id,
            "image": s.image,
            "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": s.target}],
        }
        if s.choices:
            rec["choices"] = s.choices
        records.append(rec)
    return records


def hinted_warmup_set(ctx: RunContext, model: torch.nn.Module, train: Sequence[Sample]) -> list[Sample]:
    """The run's warm-up set, generated with the gold answer in the prompt.

    Written to RUN/warmup_set.json (MathV360K format) and read back on resume, so a resumed run
    trains on exactly the same set. Targets never contain the hint: they are the original
    prompts with the generated steps and the gold answer.
    """
    cfg, run = ctx.cfg, ctx.run
    path = run.root / "warmup_set.json"
    kept = None
    if not run.done("hinted"):
        t0 = time.perf_counter()
        w = cfg.warmup
        prompts = pick_prompts(train, w.hinted_max_prompts, seed=stage_seed(cfg.seed, "hinted-prompts"))
        kept, stats = build_warmup_set(
            model,
            ctx.io,
            prompts,
            k=w.hinted_k,
            temperature=w.hinted_temperature,
            max_new_tokens=cfg.gen.max_new_tokens,
            batch_size=cfg.gen.batch_size,
            seed=stage_seed(cfg.seed, "hinted"),
            keep_per_prompt=w.hinted_keep_per_prompt,
            generate_fn=ctx.rollout,
            progress=cfg.progress,
        )
        if not kept:
            raise DataError(
                f"the answer-hinted warm-up kept none of {stats['generated']} responses to "
                f"{stats['prompts']} prompts (counts: {', '.join(f'{r} {stats[r]}' for r in REASONS)}): the "
                "model does not write steps that reach the hinted answers. Give gold chains of thought "
                "(data.seed_cot), change model.prompt_template, or set warmup.steps=0"
            )
        stats["seconds"] = time.perf_counter() - t0
        if ctx.main:
            atomic_write_text(path, dumps(warmup_records(kept)))
        run.log("hinted", **stats)
        run.finish("hinted", stats)  # [distributed] a barrier: the file exists for every rank after it
    hinted = run.result("hinted")
    ctx.say(
        f"hinted warm-up set: {hinted['kept']} responses for {hinted['kept_prompts']} of {hinted['prompts']} prompts"
    )
    return kept if kept is not None else load_samples(path)
