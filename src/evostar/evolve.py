"""The self-evolving loop.

Each iteration: generate K responses per prompt of the next slice of training prompts at
temperature T -> reward (answer match; the gym also checks every step) -> select correct
responses -> improve (SFT on them) -> monitor (greedy accuracy and Pass@K on validation) ->
checkpoint. Continuous self-evolving keeps one optimizer and LR schedule for the whole run;
iterative RFT re-creates them every iteration; ReST-EM also restarts from the initial model.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from evostar.config import Config
from evostar.distributed import generate_sharded, make_trainer
from evostar.dynamics import accuracy, all_steps_correct_share, distinct_share, pass_at_k
from evostar.evaluate import evaluate, evaluate_pass_at_k, score
from evostar.models.hub import load_policy
from evostar.models.inputs import VLMInputs
from evostar.records import Response, Sample
from evostar.rollout import make_rollout
from evostar.rundir import RunDir, stage_seed, write_jsonl
from evostar.select import select
from evostar.train import Example

if TYPE_CHECKING:
    from accelerate import Accelerator

MODES = ("continuous", "iterative_rft", "rest_em")


@dataclass
class LoopState:
    """What the loop carries between iterations besides weights and optimizer."""

    iteration: int = 0
    cursor: int = 0
    """Prompts consumed so far (kept apart from the optimizer step: resume never skips data)."""
    temperature: float = 1.0
    history: list[dict] = field(default_factory=list)


def next_slice(train: list[Sample], cursor: int, size: int, seed: int) -> list[Sample]:
    """Prompts [cursor, cursor+size) of the run's prompt stream: one shuffled pass after another."""
    n = len(train)
    out = []
    for pos in range(cursor, cursor + size):
        epoch, i = divmod(pos, n)
        order = _epoch_order(n, seed, epoch)
        out.append(train[order[i]])
    return out


_ORDERS: dict[tuple[int, int, int], np.ndarray] = {}


def _epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    key = (n, seed, epoch)
    if key not in _ORDERS:
        _ORDERS[key] = np.random.default_rng(stage_seed(seed, "data-order", epoch)).permutation(n)
    return _ORDERS[key]


def sft_steps(n_examples: int, ev) -> int:
    """Fixed `steps_per_iteration`, or enough steps for `epochs_per_iteration` passes."""
    if n_examples == 0:
        return 0
    if ev.steps_per_iteration > 0:
        return ev.steps_per_iteration
    return max(1, math.ceil(ev.epochs_per_iteration * n_examples / ev.optim.batch_size))


def evolve(
    cfg: Config,
    run: RunDir,
    model: torch.nn.Module,
    processor,
    io: VLMInputs,
    train: list[Sample],
    val: list[Sample],
    init_dir: str | Path | None,
    accelerator: Accelerator | None = None,
    backend: Callable[..., list[Response]] | None = None,
) -> tuple[torch.nn.Module, LoopState]:
    # One process without an accelerator. With one, `run` is a `distributed.SharedRunDir`;
    # rollouts are sharded and gathered, SFT batches split across ranks.
    backend = backend or make_rollout(cfg)  # hf generate, a CPU worker pool or a vLLM engine
    rollout = backend if accelerator is None else functools.partial(generate_sharded, accelerator, generate_fn=backend)
    main_process = accelerator is None or accelerator.is_main_process
    ev = cfg.evolve
    if ev.mode not in MODES:
        raise ValueError(f"evolve.mode {ev.mode!r}: choose one of {MODES}")
    slice_size = max(1, math.ceil(ev.interval * len(train)))
    state = LoopState(temperature=cfg.gen.temperature)

    done = [i for i in range(1, ev.iterations + 1) if run.done(f"iter_{i}")]
    if done:  # resume: weights, optimizer, schedule and loop state of the last finished iteration
        last = f"iter_{done[-1]}"
        model = load_policy(cfg.model, run.checkpoint_dir(last), device=model.device)
        state = LoopState(**run.load_state(last))
    trainer = make_trainer(model, io, ev.optim, accelerator)  # [distributed]
    if done and (saved := run.load_trainer_state(f"iter_{done[-1]}")) is not None:
        trainer.load_state_dict(saved)

    for it in range(state.iteration + 1, ev.iterations + 1):
        t0 = time.perf_counter()
        # Generate: K responses for each prompt of the next slice.
        prompts = next_slice(train, state.cursor, slice_size, cfg.seed)
        torch.manual_seed(stage_seed(cfg.seed, "generate", it))
        responses = rollout(  # [distributed] rollout is `generate` without an accelerator
            model, io, prompts, k=cfg.gen.k, temperature=state.temperature, top_p=cfg.gen.top_p,
            max_new_tokens=cfg.gen.max_new_tokens, batch_size=cfg.gen.batch_size, iteration=it,
            desc=f"iter {it} generate", progress=cfg.progress,
        )  # fmt: skip
        t_gen = time.perf_counter() - t0
        # Reward: final-answer match (and the gym's step truth, for monitoring only).
        score(prompts, responses)
        # Select: correct responses, by the configured strategy.
        kept = select(
            responses, ev.selection, k=ev.select_k, threshold=ev.threshold, dedupe=ev.dedupe,
            seed=stage_seed(cfg.seed, "select", it),
        )  # fmt: skip
        # Improve: SFT on the kept responses.
        if ev.mode == "rest_em":
            model = load_policy(cfg.model, init_dir, device=model.device)
            trainer = make_trainer(model, io, ev.optim, accelerator)  # [distributed]
        elif ev.mode == "iterative_rft":
            trainer.reset_optimizer()
        by_id = {s.id: s for s in prompts}
        examples = [Example(by_id[r.sample_id], r.text) for r in kept]
        t1 = time.perf_counter()
        # Continuous: this iteration is the slice [(it-1)/n, it/n] of one schedule over the run.
        span = ((it - 1) / ev.iterations, it / ev.iterations) if ev.mode == "continuous" else (0.0, 1.0)
        stats = trainer.train(
            examples, sft_steps(len(examples), ev), seed=stage_seed(cfg.seed, "sft", it),
            desc=f"iter {it} sft", progress=cfg.progress, span=span,
        )  # fmt: skip
        t_train = time.perf_counter() - t1
        # Monitor: greedy accuracy and Pass@K on the validation split.
        val_metrics, _ = evaluate(model, io, val, cfg.gen, desc=f"iter {it} val", progress=cfg.progress)
        val_pass = None
        if cfg.eval.pass_k > 0:
            torch.manual_seed(stage_seed(cfg.seed, "pass@k", it))
            pass_val = val[: cfg.eval.pass_prompts] if cfg.eval.pass_prompts else val
            pass_t = state.temperature if cfg.eval.pass_temperature < 0 else cfg.eval.pass_temperature
            val_pass, _ = evaluate_pass_at_k(model, io, pass_val, cfg.gen, cfg.eval.pass_k, pass_t, progress=cfg.progress)
        record = {
            "iteration": it,
            "prompts": len(prompts),
            "responses": len(responses),
            "kept": len(kept),
            "train_accuracy": accuracy(responses),
            "train_pass_at_k": pass_at_k(responses),
            "distinct_share": distinct_share(responses),
            "kept_steps_all_correct": all_steps_correct_share(kept),
            "val_accuracy": val_metrics["accuracy"],
            "val_pass_at_k": val_pass,
            "temperature": state.temperature,
            "sft_loss": stats["loss"],
            "sft_steps": stats["steps"],
            "sft_tokens": stats["tokens"],
            "lr": trainer.lr,
            "optimizer_step": trainer.step,
            "generate_seconds": t_gen,
            "train_seconds": t_train,
            "seconds": time.perf_counter() - t0,
        }
        state.iteration, state.cursor = it, state.cursor + len(prompts)
        state.history.append(record)
        # Checkpoint, then mark the iteration finished: a kill before this line redoes it.
        if main_process:  # [distributed] rank 0 writes the run directory
            write_jsonl(run.root / "samples" / f"iter_{it:03d}.jsonl", [r.to_dict() for r in responses])
        run.save_checkpoint(f"iter_{it}", model, processor, trainer.state_dict(), state.__dict__)
        run.log(f"iter_{it}", **record)
        run.finish(f"iter_{it}", record)
        run.prune_checkpoints(keep=["warmup", f"iter_{it}"])
    return model, state
