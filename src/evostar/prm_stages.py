"""The process reward model in a run: its stages after warm-up, scoring in the loop, and the
measures `summary.json` and `evostar prm eval` report.

With `prm.enabled` a run gains four stages between warm-up and the loop, each finished once
progress.json names it, so `--resume` skips what is done:

    prm_collect  RUN/prm/responses.jsonl       K responses per prompt of a slice of the labelled
                                               training prompts, from the warm-up policy
    prm_label    RUN/prm/labels/               Monte-Carlo step labels, chunk by chunk (a killed
                                               stage resumes at its first unfinished chunk)
    prm_train    RUN/checkpoints/prm/          the PRM, an HF checkpoint with prm_config.json
    prm_eval     RUN/prm/val_responses.jsonl   the warm-up policy's val responses, PRM-scored,
                                               and the PRM's measures against step truth

Labelling samples its completions in this process with transformers' generate (`hf_completer`)
from the policy, whatever `gen.backend` is: neither the CPU worker pool nor the vLLM engine
continues an assistant-turn prefix. The collect and eval stages sample with the run's backend.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from evostar.config import PRMConfig
from evostar.dynamics import accuracy, reward_pass_at_k
from evostar.errors import RunDirError, UserError
from evostar.evaluate import score, step_truth
from evostar.models.inputs import VLMInputs
from evostar.records import Response, Sample, split_steps
from evostar.reward.prm import (
    PRM,
    PRMTrainer,
    examples_from_labels,
    first_error_f1,
    hf_completer,
    init_prm,
    label_quality,
    label_responses,
    load_prm,
    read_labels,
    score_responses,
    selection_accuracy,
    step_auroc,
)
from evostar.reward.prm.baselines import baseline_measures, policy_step_scores
from evostar.reward.prm.labels import StepLabels, read_manifest
from evostar.rundir import RunDir, read_jsonl, stage_seed, write_jsonl
from evostar.select import select

if TYPE_CHECKING:
    from evostar.context import RunContext
    from evostar.pipeline import Data

__all__ = [
    "PRM_STAGES",
    "collect_prompts",
    "collect_stage",
    "eval_report",
    "eval_stage",
    "judge_baselines",
    "label_stage",
    "labels_against_truth",
    "plot_selection",
    "process_measures",
    "prm_summary",
    "read_responses",
    "run_prm_stages",
    "sample_responses",
    "score_with",
    "train_prm",
    "train_stage",
]

PRM_STAGES = ("prm_collect", "prm_label", "prm_train", "prm_eval")
SELECTION_KS = (1, 2, 4, 8, 16)


# --------------------------------------------------------------------------------- shared steps
def collect_prompts(samples: Sequence[Sample], n: int, seed: int) -> list[Sample]:
    """`n` labelled prompts drawn at random (seeded), in a fixed order; all when fewer."""
    labelled = [s for s in samples if s.answer is not None]
    order = np.random.default_rng(stage_seed(seed, "prm-collect-prompts")).permutation(len(labelled))
    return [labelled[i] for i in sorted(order[:n])]


def read_responses(path: Path) -> list[Response]:
    """Responses written as JSONL (`Response.to_dict` lines), or a UserError naming the line."""
    if not path.is_file():
        raise UserError(f"{path}: no such file of responses")
    try:
        rows = read_jsonl(path)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UserError(f"{path}: not JSONL responses ({err})") from None
    out = []
    for k, row in enumerate(rows, 1):
        if (
            not isinstance(row, dict)
            or not isinstance(row.get("sample_id"), str)
            or not isinstance(row.get("text"), str)
        ):
            raise UserError(f"{path} line {k}: a response needs text fields 'sample_id' and 'text'")
        out.append(Response.from_dict(row))
    return out


def score_with(
    prm: PRM, cfg: PRMConfig, samples: Sequence[Sample], responses: list[Response], progress: bool = False
) -> list[Response]:
    """`score_responses` with the run's aggregation settings."""
    return score_responses(
        prm,
        samples,
        responses,
        aggregate=cfg.aggregate,
        include_answer=cfg.score_answer,
        batch_size=cfg.score_batch_size,
        autocast=cfg.score_autocast,
        progress=progress,
    )


def train_prm(
    init: str | Path,
    labels: Sequence[StepLabels],
    samples: Sequence[Sample],
    cfg: PRMConfig,
    *,
    prompt_template: str = "{question}",
    system_prompt: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    seed: int = 0,
    progress: bool = False,
) -> tuple[PRM, dict[str, Any]]:
    """A PRM initialised from the checkpoint `init` and trained on `labels`; and what training did."""
    torch.manual_seed(seed)
    prm = init_prm(
        init,
        tag=cfg.tag or None,
        prompt_template=prompt_template,
        system_prompt=system_prompt,
        dtype=dtype,
        device=device,
        trust_remote_code=trust_remote_code,
    )
    examples = examples_from_labels(labels, {s.id: s for s in samples}, label=cfg.label, answer=cfg.train_answer)
    targets = [t for e in examples for t in e.targets if t is not None]
    trainer = PRMTrainer(prm, cfg.optim, negative_weight=cfg.negative_weight, freeze_vision=cfg.freeze_vision)
    info = trainer.train(examples, cfg.steps, seed=seed, progress=progress)
    positive = float(np.mean(targets)) if targets else None
    return prm, {**info, "examples": len(examples), "targets": len(targets), "positive_share": positive}


def labels_against_truth(labels: Sequence[StepLabels], samples: Sequence[Sample]) -> dict[str, Any] | None:
    """`label_quality` of `labels` against the gym's step truth (None for data without it)."""
    by_id = {s.id: s for s in samples}
    return label_quality(labels, [step_truth(by_id[lab.sample_id], lab.text) for lab in labels])


def _invalid_rate(kept: Sequence[Response]) -> float | None:
    """Share of `kept` with a wrong step by the checker (None when there are none)."""
    return float(np.mean([not r.all_steps_correct for r in kept])) if kept else None


def process_measures(responses: Sequence[Response], seed: int = 0) -> dict[str, Any]:
    """The PRM against step truth on scored, rewarded responses: step AUROC, ProcessBench's
    first-error F1, and among correct responses with step truth the share with a wrong step
    over all of them, the PRM's top-2 and a random 2 per prompt (None where truth is unknown)."""
    known = [r for r in responses if r.correct and r.steps_correct is not None]
    f1 = first_error_f1(responses)

    def picks(strategy: str) -> list[Response]:
        return select(known, strategy, k=2, dedupe=False, seed=stage_seed(seed, "prm-random2"))

    return {
        "step_truth": "known" if any(r.steps_correct is not None for r in responses) else "unknown",
        "step_auroc_val": step_auroc(responses),
        "first_error_f1_val": f1["f1"],
        "first_error": f1,
        "invalid_rate_all": _invalid_rate(known),
        "invalid_rate_top2": _invalid_rate(picks("top_k")),
        "invalid_rate_random2": _invalid_rate(picks("random_k")),
        "reward_pass_at_2": reward_pass_at_k(responses, 2),
        "correct_with_truth": len(known),
    }


def judge_baselines(
    model: torch.nn.Module,
    io: VLMInputs,
    samples: Sequence[Sample],
    responses: Sequence[Response],
    batch_size: int = 16,
    progress: bool = False,
) -> dict[str, Any] | None:
    """The PRM's baselines on the same responses ("every step is right", the policy's own
    per-step token confidence); None where no response has step truth."""
    if not any(r.steps_correct is not None for r in responses):
        return None
    scores = policy_step_scores(model, io, samples, responses, batch_size=batch_size, progress=progress)
    return baseline_measures(responses, scores)


# --------------------------------------------------------------------------------- run stages
def run_prm_stages(ctx: RunContext, model: torch.nn.Module, data: Data, policy_dir: str | Path) -> PRM:
    """Collect -> label -> train -> eval (each skipped when finished); the trained PRM.

    `model` is the warm-up policy, saved at `policy_dir` (where `prm.init: policy` starts from).
    """
    if ctx.accelerator is not None:
        raise UserError(
            "prm.enabled: the PRM stages run in one process; run them (and the loop) without "
            "accelerate launch / torchrun, or set prm.enabled=false"
        )
    labels: list[StepLabels] = []  # a trained PRM needs neither its responses nor its labels again
    if not ctx.run.done("prm_train"):
        labels = label_stage(ctx, model, data.train, collect_stage(ctx, model, data.train))
    prm = train_stage(ctx, data.train, labels, policy_dir)
    eval_stage(ctx, model, prm, data.val)
    return prm


def _sample(ctx: RunContext, model: torch.nn.Module, prompts: Sequence[Sample], seed: int, desc: str) -> list[Response]:
    """The PRM's K responses per prompt with the run's rollout backend, rewarded."""
    p, gen = ctx.cfg.prm, ctx.cfg.gen
    torch.manual_seed(seed)
    responses = ctx.rollout(
        model,
        ctx.io,
        prompts,
        k=p.collect_k,
        temperature=p.collect_temperature,
        top_p=gen.top_p,
        max_new_tokens=gen.max_new_tokens,
        batch_size=gen.batch_size,
        iteration=0,
        desc=desc,
        progress=ctx.cfg.progress,
    )
    return score(prompts, responses)


def collect_stage(ctx: RunContext, model: torch.nn.Module, train: Sequence[Sample]) -> list[Response]:
    """The PRM's training responses: sampled once, then read back (a resume draws nothing new)."""
    run, cfg = ctx.run, ctx.cfg
    path = run.root / "prm" / "responses.jsonl"
    if not run.done("prm_collect"):
        t0 = time.perf_counter()
        prompts = collect_prompts(train, cfg.prm.collect_prompts, cfg.seed)
        responses = _sample(ctx, model, prompts, stage_seed(cfg.seed, "prm-collect"), "prm collect")
        write_jsonl(path, [r.to_dict() for r in responses])
        res = {
            "prompts": len(prompts),
            "responses": len(responses),
            "accuracy": accuracy(responses),
            "seconds": time.perf_counter() - t0,
        }
        run.log("prm_collect", **res)
        run.finish("prm_collect", res)
    if not path.is_file():
        raise RunDirError(f"{path}: the collected PRM responses are missing; the run directory may be damaged")
    return read_responses(path)


def label_stage(
    ctx: RunContext, model: torch.nn.Module, train: Sequence[Sample], responses: Sequence[Response]
) -> list[StepLabels]:
    """Step labels of the collected responses, with the policy as the Monte-Carlo completer."""
    run, cfg, p = ctx.run, ctx.cfg, ctx.cfg.prm
    out = run.root / "prm" / "labels"
    if run.done("prm_label"):
        return read_labels(out)
    t0 = time.perf_counter()
    before = read_manifest(out)
    done_before = set(before["done"]) if before else set()
    completer = hf_completer(
        model,
        ctx.io,
        temperature=p.temperature,
        top_p=p.top_p,
        max_new_tokens=p.max_new_tokens,
        batch_size=p.completion_batch_size,
        progress=cfg.progress,
    )
    labels = label_responses(
        train,
        responses,
        completer,
        out,
        n=p.n_completions,
        strategy=p.strategy,
        chunk_size=p.chunk_size,
        seed=stage_seed(cfg.seed, "prm-label"),
        settings={"temperature": p.temperature, "top_p": p.top_p, "max_new_tokens": p.max_new_tokens},
    )
    seconds = time.perf_counter() - t0
    spent = (read_manifest(out) or {}).get("spent") or {}  # completions sampled, shared prefixes once
    fresh = [lab for k, lab in enumerate(labels) if k // p.chunk_size not in done_before]
    step_labels = sum(len(lab.hard) for lab in labels)
    res = {
        "responses": len(labels),
        "step_labels": step_labels,
        "positive_share": float(np.mean([h for lab in labels for h in lab.hard])) if step_labels else None,
        "first_error_share": float(np.mean([lab.first_error is not None for lab in labels])) if labels else None,
        "completions": sum(int(v) for v in spent.values()),
        # this process's labels over its seconds (a resumed stage counts only what it labelled)
        "labels_per_second": sum(len(lab.hard) for lab in fresh) / seconds if fresh and seconds > 0 else None,
        "against_truth": labels_against_truth(labels, train),
        "seconds": seconds,
    }
    run.log("prm_label", **res)
    run.finish("prm_label", res)
    return labels


def train_stage(ctx: RunContext, train: Sequence[Sample], labels: Sequence[StepLabels], policy_dir: str | Path) -> PRM:
    """The trained PRM: reloaded from checkpoints/prm once finished, never retrained."""
    run, cfg = ctx.run, ctx.cfg
    ckpt, dtype = run.checkpoint_dir("prm"), getattr(torch, cfg.model.dtype)
    trust = cfg.model.trust_remote_code
    if run.done("prm_train"):
        return load_prm(ckpt, dtype=dtype, device=ctx.device, trust_remote_code=trust)
    t0 = time.perf_counter()
    prm, info = train_prm(
        policy_dir if cfg.prm.init == "policy" else cfg.prm.init,
        labels,
        train,
        cfg.prm,
        prompt_template=cfg.model.prompt_template,
        system_prompt=cfg.model.system_prompt or None,
        dtype=dtype,
        device=ctx.device,
        trust_remote_code=trust,
        seed=stage_seed(cfg.seed, "prm-train"),
        progress=cfg.progress,
    )
    prm.save(ckpt)
    res = {**info, "seconds": time.perf_counter() - t0}
    run.log("prm_train", **res)
    run.finish("prm_train", res)
    return prm


def eval_stage(ctx: RunContext, model: torch.nn.Module, prm: PRM, val: Sequence[Sample]) -> None:
    """The PRM's measures on the warm-up policy's K responses per val prompt."""
    run, cfg = ctx.run, ctx.cfg
    if not run.done("prm_eval"):
        t0 = time.perf_counter()
        prompts = list(val[: cfg.prm.eval_prompts] if cfg.prm.eval_prompts else val)
        responses = _sample(ctx, model, prompts, stage_seed(cfg.seed, "prm-eval"), "prm eval")
        score_with(prm, cfg.prm, prompts, responses, cfg.progress)
        write_jsonl(run.root / "prm" / "val_responses.jsonl", [r.to_dict() for r in responses])
        res = {
            **process_measures(responses, cfg.seed),
            "baselines": judge_baselines(model, ctx.io, prompts, responses, cfg.prm.score_batch_size, cfg.progress),
            "seconds": time.perf_counter() - t0,
        }
        run.log("prm_eval", **res)
        run.finish("prm_eval", res)
    res = run.result("prm_eval")
    shown = {k: res[k] for k in ("step_auroc_val", "first_error_f1_val", "invalid_rate_top2", "invalid_rate_random2")}
    policy = (res.get("baselines") or {}).get("policy_logprob")
    if policy:
        shown["policy_logprob_auroc"] = policy["step_auroc"]
    ctx.say("prm: " + ", ".join(f"{k} {'-' if v is None else f'{v:.3f}'}" for k, v in shown.items()))


def prm_summary(run: RunDir) -> tuple[dict[str, float], dict[str, Any]]:
    """`stage_seconds` entries of the PRM stages, and summary.json's `prm` object."""
    seconds = {stage: run.result(stage)["seconds"] for stage in PRM_STAGES if run.done(stage)}
    label, train, measures = (run.result(s) or {} for s in ("prm_label", "prm_train", "prm_eval"))
    summary = {
        **{k: v for k, v in measures.items() if k != "seconds"},
        "completions": label.get("completions"),
        "labels_per_second": label.get("labels_per_second"),
        "step_labels": label.get("step_labels"),
        "labels_against_truth": label.get("against_truth"),
        "train_loss": train.get("loss"),
        "train_steps": train.get("steps"),
        "collected": (run.result("prm_collect") or {}).get("responses"),
    }
    return seconds, summary


# --------------------------------------------------------------------------------- prm eval
def _top2_vs_rest(responses: Sequence[Response], seed: int = 0) -> dict[str, Any]:
    """Among correct responses: PRM top-2 per prompt against the other correct ones (and a
    random 2 per prompt), by mean number of steps and share with every step right (None when
    step truth is unknown). Prompts with at most 2 correct responses count in every group."""
    top = select(responses, "top_k", k=2, dedupe=False)
    random2 = select(responses, "random_k", k=2, dedupe=False, seed=stage_seed(seed, "prm-random2"))
    picked = {id(r) for r in top}
    rest = [r for r in responses if r.correct and id(r) not in picked]

    def describe(group: Sequence[Response]) -> dict[str, Any]:
        known = [r for r in group if r.steps_correct is not None]
        return {
            "n": len(group),
            "mean_steps": float(np.mean([len(split_steps(r.text)) for r in group])) if group else None,
            "all_steps_correct": float(np.mean([bool(r.all_steps_correct) for r in known])) if known else None,
        }

    return {"top2": describe(top), "rest": describe(rest), "random2": describe(random2)}


def eval_report(
    responses: Sequence[Response],
    greedy: Sequence[Response],
    ks: Sequence[int] = SELECTION_KS,
    baselines: dict[str, Any] | None = None,
) -> dict:
    """What `evostar prm eval` prints: the PRM as a step judge (where step truth exists), as a
    verifier (best-of-N, majority and weighted voting beside greedy) and as a reranker."""
    truth = any(r.steps_correct is not None for r in responses)
    curves: dict[str, Any] = {name: dict(v) for name, v in selection_accuracy(responses, ks).items()}
    out: dict[str, Any] = {
        "prompts": len({r.sample_id for r in responses}),
        "responses": len(responses),
        "step_truth": "known" if truth else "unknown",
    }
    if truth:
        out["step_auroc"] = step_auroc(responses)
        out["first_error_f1"] = first_error_f1(responses)
        if baselines is not None:
            out["baselines"] = baselines
    out["accuracy"] = {**curves, "greedy": accuracy(greedy)}
    out["correct_top2_vs_rest"] = _top2_vs_rest(responses)
    return out


def plot_selection(report: dict, path: Path) -> Path:
    """Accuracy against N for best-of-N by PRM, majority and PRM-weighted voting, greedy flat."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = report["accuracy"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    labels = {"best_of_n": "best-of-N by PRM", "majority": "majority vote", "weighted": "PRM-weighted vote"}
    ns: list[int] = []
    for key, label in labels.items():
        ns = sorted(int(n) for n in acc[key])
        ax.plot(ns, [100 * acc[key][n] for n in ns], marker="o", label=label)
    ax.axhline(100 * acc["greedy"], color="gray", linestyle="--", label="greedy")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns or [1])
    ax.set_xticklabels([str(n) for n in ns or [1]])
    ax.set_xlabel("N (samples per prompt)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"PRM as a verifier ({report['prompts']} prompts)")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def sample_responses(
    model: torch.nn.Module,
    io: VLMInputs,
    samples: Sequence[Sample],
    *,
    k: int,
    temperature: float,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
    desc: str = "sample",
) -> list[Response]:
    """K responses per prompt with transformers' generate, seeded and rewarded (the CLI's sampler)."""
    from evostar.rollout.hf import generate

    torch.manual_seed(seed)
    responses = generate(
        model,
        io,
        samples,
        k=k,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        desc=desc,
        progress=False,
    )
    return score(samples, responses)
