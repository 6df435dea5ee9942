"""The self-evolving loop.

Each iteration: adapt (every few iterations, the temperature whose validation samples are worth
most) -> generate K responses per prompt of the next slice of training prompts at temperature
T (and of unlabeled prompts, pseudo-labelled by their own votes) -> reward (answer match; the
gym also checks every step; with a PRM, its score) -> select correct responses -> improve (SFT
on them) -> monitor (greedy accuracy, Pass@K and Reward-Pass@k on validation) -> checkpoint. Continuous self-evolving keeps one optimizer and LR schedule for the whole run;
iterative RFT re-creates them every iteration; ReST-EM also restarts from the initial model.
"""

from __future__ import annotations

import dataclasses
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from evostar.config import SCORED_SELECTIONS, Config, EvolveConfig
from evostar.context import RunContext
from evostar.dynamics import (
    accuracy,
    all_steps_correct_share,
    candidate_metrics,
    choose_temperature,
    distinct_share,
    mean_steps,
    pass_at_k,
    reward_pass_at_k,
)
from evostar.errors import RunDirError
from evostar.evaluate import evaluate, score
from evostar.models.hub import load_policy
from evostar.prm_stages import score_with
from evostar.pseudo import pseudo_labelled
from evostar.records import Response, Sample
from evostar.rundir import stage_seed
from evostar.select import select
from evostar.train import Example, SFTTrainer, make_trainer

if TYPE_CHECKING:
    from evostar.reward.prm import PRM


@dataclass
class LoopState:
    """What the loop carries between iterations besides weights and optimizer."""

    iteration: int = 0
    cursor: int = 0
    """Prompts consumed so far (kept apart from the optimizer step: resume never skips data)."""
    temperature: float = 1.0
    """Sampling temperature in use: gen.temperature, or the controller's last choice."""
    history: list[dict] = field(default_factory=list)
    unlabeled_cursor: int = 0
    """Unlabeled prompts consumed so far (a stream of its own)."""

    @classmethod
    def from_checkpoint(cls, saved: dict, path: Path) -> LoopState:
        """The state a checkpoint's state.json holds, or a RunDirError naming the file (states
        saved before `unlabeled_cursor` existed read as 0, which is what those runs did)."""
        kinds = {"iteration": int, "cursor": int, "temperature": (int, float), "history": list}
        optional = {"unlabeled_cursor": int}
        if not (set(kinds) <= set(saved) <= set(kinds) | set(optional)) or not all(
            isinstance(saved[k], t) for k, t in {**kinds, **optional}.items() if k in saved
        ):
            raise RunDirError(f"{path}: not a loop state ({sorted(kinds)} with their types); it may be damaged")
        return cls(**saved)


def evolve(
    ctx: RunContext,
    model: torch.nn.Module,
    train: list[Sample],
    val: list[Sample],
    init_dir: Path | None,
    prm: PRM | None = None,
    unlabeled: list[Sample] | None = None,
) -> tuple[torch.nn.Module, LoopState]:
    """Run (or resume) `cfg.evolve.iterations` iterations; the trained model and the loop state.

    With a `prm`, sampled responses get its score where top_k / threshold (the correct ones) or
    PRM-weighted votes (all) read it (`prm.score_unused`: all, always); `unlabeled` prompts join
    from `evolve.unlabeled_from` on."""
    cfg, ev = ctx.cfg, ctx.cfg.evolve
    model, trainer, state = start_or_resume(ctx, model)
    for it in range(state.iteration + 1, ev.iterations + 1):
        clock = Clock()
        # Adapt: every adapt.every iterations, the temperature whose validation samples are worth most.
        with clock("adapt"):
            adapted = adapt_temperature(ctx, model, val, state.temperature, it, prm)
        state.temperature = adapted["temperature"] if adapted else state.temperature
        prompts = next_slice(train, state.cursor, slice_size(len(train), ev.interval), cfg.seed)
        # Generate: K responses for each prompt of the next slice, at the loop's temperature.
        with clock("generate"):
            responses = ctx.sample(model, prompts, state.temperature, seed=stage_seed(cfg.seed, "generate", it), it=it)
        # Reward: final-answer match (and the gym's step truth, for monitoring); the PRM's, if ranked by.
        score(prompts, responses)
        if prm is not None and (ranked := scores_read(cfg, responses)):
            with clock("prm_score"):
                score_with(prm, cfg.prm, prompts, ranked, cfg.progress)
        # Unlabeled prompts: sampled the same way, rewarded against the answer their samples vote for.
        extra = unlabeled_step(ctx, model, unlabeled, state, it, prm)
        pool, sampled = prompts + extra["prompts"], responses + extra["responses"]
        # Select: the correct responses to learn from, by the configured strategy.
        kept = select_kept(sampled, ev, seed=stage_seed(cfg.seed, "select", it))
        # Improve: SFT on the kept responses (after the mode's restart, if any).
        model, trainer = restart_for_mode(ctx, model, trainer, init_dir)
        with clock("train"):
            stats = improve(trainer, sft_examples(pool, kept), it, cfg)
        # Monitor: greedy accuracy, Pass@K (and the PRM's Reward-Pass@k) on the validation split.
        monitor = validate(ctx, model, val, state.temperature, it, prm)
        # Checkpoint: weights, optimizer, loop state and samples; only then is the iteration done.
        record = iteration_record(it, prompts, responses, kept, stats, monitor, trainer, state, clock)
        record.update(adapted_record(adapted) | unlabeled_record(extra, kept))
        state.iteration, state.cursor = it, state.cursor + len(prompts)
        state.unlabeled_cursor += len(extra["all_prompts"])
        state.history.append(record)
        save_iteration(ctx, model, trainer, state, sampled)
    return model, state


# --------------------------------------------------------------------------------- the steps
def start_or_resume(ctx: RunContext, model: torch.nn.Module) -> tuple[torch.nn.Module, SFTTrainer, LoopState]:
    """A fresh loop on `model`, or the weights, optimizer and state of the last finished iteration."""
    cfg, run = ctx.cfg, ctx.run
    state = LoopState(temperature=cfg.gen.temperature)
    done = [i for i in range(1, cfg.evolve.iterations + 1) if run.done(f"iter_{i}")]
    last = f"iter_{done[-1]}" if done else None
    if last:
        model = load_policy(cfg.model, run.checkpoint_dir(last), device=model.device)
        state = LoopState.from_checkpoint(run.load_state(last), run.checkpoint_dir(last) / "state.json")
    trainer = make_trainer(model, ctx.io, cfg.evolve.optim, ctx.accelerator)  # [distributed]
    if last:
        saved = run.load_trainer_state(last)
        if saved is None:  # a fresh optimizer would silently change the rest of the run
            raise RunDirError(f"{run.checkpoint_dir(last)}: trainer.pt (optimizer and schedule) is missing")
        trainer.load_state_dict(saved)
    return model, trainer, state


def next_slice(train: list[Sample], cursor: int, size: int, seed: int) -> list[Sample]:
    """Prompts [cursor, cursor+size) of the run's prompt stream: one shuffled pass after another."""
    n = len(train)
    out = []
    for pos in range(cursor, cursor + size):
        epoch, i = divmod(pos, n)
        out.append(train[_epoch_order(n, seed, epoch)[i]])
    return out


_ORDERS: dict[tuple[int, int, int], np.ndarray] = {}


def _epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    key = (n, seed, epoch)
    if key not in _ORDERS:
        _ORDERS[key] = np.random.default_rng(stage_seed(seed, "data-order", epoch)).permutation(n)
    return _ORDERS[key]


def slice_size(n_train: int, interval: float) -> int:
    """Prompts per iteration: the `interval` share of the training prompts."""
    return max(1, math.ceil(interval * n_train))


def restart_for_mode(
    ctx: RunContext, model: torch.nn.Module, trainer: SFTTrainer, init_dir: Path | None
) -> tuple[torch.nn.Module, SFTTrainer]:
    """ReST-EM restarts from the initial model with a new optimizer; iterative RFT gets a new
    optimizer; continuous self-evolving keeps both."""
    cfg = ctx.cfg
    if cfg.evolve.mode == "rest_em":
        model = load_policy(cfg.model, init_dir, device=model.device)
        trainer = make_trainer(model, ctx.io, cfg.evolve.optim, ctx.accelerator)  # [distributed]
    elif cfg.evolve.mode == "iterative_rft":
        trainer.reset_optimizer()
    return model, trainer


def select_kept(responses: list[Response], ev: EvolveConfig, seed: int) -> list[Response]:
    """`select` with the loop's selection settings."""
    return select(responses, ev.selection, k=ev.select_k, threshold=ev.threshold, dedupe=ev.dedupe, seed=seed)


def improve(trainer: SFTTrainer, examples: list[Example], it: int, cfg: Config) -> dict:
    """SFT for iteration `it`: its share of the schedule, a seed of its own, steps by the data."""
    ev = cfg.evolve
    steps, seed = sft_steps(len(examples), ev), stage_seed(cfg.seed, "sft", it)
    span = schedule_span(it, ev)
    return trainer.train(examples, steps, seed=seed, desc=f"iter {it} sft", progress=cfg.progress, span=span)


def sft_examples(prompts: list[Sample], kept: list[Response]) -> list[Example]:
    by_id = {s.id: s for s in prompts}
    return [Example(by_id[r.sample_id], r.text) for r in kept]


def sft_steps(n_examples: int, ev: EvolveConfig) -> int:
    """Fixed `steps_per_iteration`, or enough steps for `epochs_per_iteration` passes."""
    if n_examples == 0:
        return 0
    if ev.steps_per_iteration > 0:
        return ev.steps_per_iteration
    return max(1, math.ceil(ev.epochs_per_iteration * n_examples / ev.optim.batch_size))


def schedule_span(it: int, ev: EvolveConfig) -> tuple[float, float]:
    """Continuous: iteration `it` is the slice [(it-1)/n, it/n] of one LR schedule over the run;
    the other modes run the whole schedule every iteration."""
    return ((it - 1) / ev.iterations, it / ev.iterations) if ev.mode == "continuous" else (0.0, 1.0)


def validate(
    ctx: RunContext, model: torch.nn.Module, val: list[Sample], temperature: float, it: int, prm: PRM | None = None
) -> dict:
    """Greedy accuracy on the validation split, and Pass@K at the configured temperature on the
    first `eval.pass_prompts` of it with greedy accuracy on those same prompts, so the two
    compare (K samples at a high temperature can still all miss where greedy is right); with a
    PRM, Reward-Pass@k on the same K samples (a correct response among its top
    `prm.reward_pass_k`)."""
    cfg = ctx.cfg
    metrics, greedy = evaluate(model, ctx.io, val, cfg.gen, desc=f"iter {it} val", progress=cfg.progress)
    out: dict = {"val_accuracy": metrics["accuracy"], "val_pass_at_k": None}
    if cfg.eval.pass_k > 0:
        n = cfg.eval.pass_prompts or len(val)
        pass_val, pass_greedy = val[:n], greedy[:n]  # greedy responses come back in prompt order
        pass_t = temperature if cfg.eval.pass_temperature is None else cfg.eval.pass_temperature
        seed = stage_seed(cfg.seed, "pass@k", it)
        sampled = score(pass_val, ctx.sample(model, pass_val, pass_t, seed=seed, it=it, k=cfg.eval.pass_k))
        out["val_pass_at_k"] = pass_at_k(sampled)
        out["val_greedy_on_pass_prompts"] = accuracy(pass_greedy)
        out["val_pass_minus_greedy"] = out["val_pass_at_k"] - out["val_greedy_on_pass_prompts"]
        out["val_distinct_share"] = distinct_share(sampled)
        if prm is not None:
            score_with(prm, cfg.prm, pass_val, sampled, cfg.progress)
            out["val_reward_pass_at_k"] = reward_pass_at_k(sampled, cfg.prm.reward_pass_k)
    return out


# --------------------------------------------------------------------------------- adapt
def adapt_temperature(
    ctx: RunContext, model: torch.nn.Module, val: list[Sample], current: float, it: int, prm: PRM | None
) -> dict | None:
    """Before iterations 1, 1 + every, ...: sample K per validation prompt at every candidate
    temperature and return the one the controller's measure prefers, with the whole curve.
    None for the static controller and between choices. Seeded per iteration and candidate, on
    the weights of the last finished iteration, so a resumed run chooses what it chose before."""
    cfg, a = ctx.cfg, ctx.cfg.adapt
    if a.controller == "static" or (it - 1) % a.every:
        return None
    prompts = val[: a.prompts] if a.prompts else val
    threshold = cfg.evolve.threshold if prm is not None else None
    curve: dict[float, dict] = {}
    for t in a.grid():
        seed = stage_seed(cfg.seed, "adapt", it, f"{t:.6f}")
        sampled = score(prompts, ctx.sample(model, prompts, t, seed=seed, it=it, k=a.k or cfg.gen.k))
        if prm is not None:
            score_with(prm, cfg.prm, prompts, sampled)
        curve[t] = candidate_metrics(sampled, a.reward_pass_k, a.balance_n_star, threshold)
    chosen = choose_temperature(curve, a.controller, current)
    ctx.run.log(
        "adapt",
        part_of=f"iter_{it}",
        iteration=it,
        controller=a.controller,
        chosen=chosen,
        previous=current,
        curve=curve,
    )
    ctx.say(f"iter {it}: temperature {current:g} -> {chosen:g} ({a.controller})")
    return {"temperature": chosen, "previous": current, "curve": curve}


def adapted_record(adapted: dict | None) -> dict:
    """What the iteration's metrics line says about the controller (nothing when it did not run)."""
    if adapted is None:
        return {"adapted": False}
    curve = {f"{t:g}": m for t, m in adapted["curve"].items()}  # JSON keys are strings
    return {"adapted": True, "temperature_previous": adapted["previous"], "temperature_curve": curve}


# --------------------------------------------------------------------------------- unlabeled
def mixes_unlabeled(unlabeled: list[Sample] | None, it: int, ev: EvolveConfig) -> bool:
    """Unlabeled prompts join iteration `it` once `unlabeled_from` of the iterations are done."""
    return bool(unlabeled) and (it - 1) >= ev.unlabeled_from * ev.iterations - 1e-9


def scores_read(cfg: Config, responses: list[Response]) -> list[Response]:
    """The rewarded training responses whose PRM scores the loop reads: the correct ones where the
    selection ranks by them (it keeps nothing else), none otherwise; all with `prm.score_unused`."""
    if cfg.prm.score_unused:
        return responses
    if cfg.evolve.selection in SCORED_SELECTIONS:
        return [r for r in responses if r.correct]
    return []


def unlabeled_step(
    ctx: RunContext, model: torch.nn.Module, unlabeled: list[Sample] | None, state: LoopState, it: int, prm: PRM | None
) -> dict:
    """The next slice of the unlabeled pool: K samples per prompt, each prompt labelled by its
    samples' vote (or its true answer, `oracle`) and the samples rewarded against that label.
    Nothing (empty lists) before `evolve.unlabeled_from` or without a pool."""
    cfg, ev = ctx.cfg, ctx.cfg.evolve
    if not mixes_unlabeled(unlabeled, it, ev):
        return {"all_prompts": [], "prompts": [], "responses": [], "stats": None}
    size = slice_size(len(unlabeled), ev.interval)
    prompts = next_slice(unlabeled, state.unlabeled_cursor, size, stage_seed(cfg.seed, "unlabeled"))
    hidden = [dataclasses.replace(s, answer=None) for s in prompts]  # the votes never see an answer
    seed = stage_seed(cfg.seed, "generate-unlabeled", it)
    responses = score(hidden, ctx.sample(model, hidden, state.temperature, seed=seed, it=it))
    votes_read_scores = prm is not None and ev.pseudo_label == "prm_weighted"
    if votes_read_scores:
        score_with(prm, cfg.prm, hidden, responses, cfg.progress)
    labelled, stats = pseudo_labelled(prompts, responses, ev.pseudo_label)
    ids = {s.id for s in labelled}
    responses = [r for r in responses if r.sample_id in ids]  # no label, nothing to reward
    score(labelled, responses)
    if prm is not None and not votes_read_scores and (ranked := scores_read(cfg, responses)):
        score_with(prm, cfg.prm, labelled, ranked, cfg.progress)
    return {"all_prompts": prompts, "prompts": labelled, "responses": responses, "stats": stats}


def unlabeled_record(extra: dict, kept: list[Response]) -> dict:
    if extra["stats"] is None:
        return {}
    ids = {s.id for s in extra["prompts"]}
    return {**extra["stats"], "unlabeled_kept": sum(r.sample_id in ids for r in kept)}


class Clock:
    """Seconds per named phase of an iteration, and since the iteration began."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - t0

    def total(self) -> float:
        return time.perf_counter() - self.start


def iteration_record(
    it: int,
    prompts: list[Sample],
    responses: list[Response],
    kept: list[Response],
    stats: dict,
    monitor: dict,
    trainer: SFTTrainer,
    state: LoopState,
    clock: Clock,
) -> dict:
    """The iteration's line of metrics.jsonl (and of the summary)."""
    return {
        "iteration": it,
        "prompts": len(prompts),
        "responses": len(responses),
        "correct": sum(bool(r.correct) for r in responses),
        "kept": len(kept),
        "train_accuracy": accuracy(responses),
        "train_pass_at_k": pass_at_k(responses),
        "distinct_share": distinct_share(responses),
        "kept_steps_all_correct": all_steps_correct_share(kept),
        "mean_response_chars": float(np.mean([len(r.text) for r in responses])) if responses else None,
        "mean_steps": mean_steps(responses),
        "kept_mean_steps": mean_steps(kept),
        **monitor,
        "temperature": state.temperature,
        "sft_loss": stats["loss"],
        "sft_steps": stats["steps"],
        "sft_tokens": stats["tokens"],
        "lr": trainer.lr,
        "optimizer_step": trainer.step,
        "generate_seconds": clock.seconds["generate"],
        "train_seconds": clock.seconds["train"],
        **({"prm_score_seconds": clock.seconds["prm_score"]} if "prm_score" in clock.seconds else {}),
        "adapt_seconds": clock.seconds.get("adapt", 0.0),
        "seconds": clock.total(),
    }


def save_iteration(
    ctx: RunContext, model: torch.nn.Module, trainer: SFTTrainer, state: LoopState, responses: list[Response]
) -> None:
    """Samples, checkpoint, then the iteration counts as finished: a kill before that redoes it."""
    run, it, record = ctx.run, state.iteration, state.history[-1]
    run.write_samples(it, [r.to_dict() for r in responses])
    run.save_checkpoint(f"iter_{it}", model, ctx.processor, trainer.state_dict(), state.__dict__)
    run.log(f"iter_{it}", **record)
    run.finish(f"iter_{it}", record)
    ctx.track(record, step=it)
    run.prune_checkpoints(keep=["warmup", "prm", f"iter_{it}"])
