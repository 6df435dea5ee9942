"""A whole experiment as resumable stages: base eval -> warm-up -> [PRM: collect -> label ->
train -> eval] -> self-evolving -> final eval.

`evostar evolve` and `evostar demo` both end here, so the gym and real data share one path.
Each stage is skipped when the run directory says it finished, so `--resume` continues a
killed run where it stopped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from evostar.config import Config
from evostar.context import RunContext, open_run, prompt_encoder
from evostar.data.loaders import load_samples
from evostar.data.parse import DataError
from evostar.evaluate import evaluate
from evostar.evolve import LoopState, evolve
from evostar.hinted import hinted_warmup_set
from evostar.launch import check_environment
from evostar.models.hub import context_length, load_policy
from evostar.models.inputs import VLMInputs
from evostar.prm_stages import prm_summary, run_prm_stages
from evostar.records import Sample
from evostar.rundir import atomic_write_json, stage_seed
from evostar.train import WarmupCheckpoint, warmup


@dataclass
class Data:
    train: list[Sample]
    val: list[Sample]
    tests: dict[str, list[Sample]]
    seed_cot: list[Sample]
    files: dict[str, str] = field(default_factory=dict)
    unlabeled: list[Sample] = field(default_factory=list)
    """The pseudo-labelled pool (data.unlabeled); its answers reach the loop only as the oracle."""
    """Role (train, val, seed_cot, test NAME) -> the file it came from, for error messages."""


def run_experiment(
    cfg: Config, resume: bool = False, extra: dict[str, Any] | None = None, console: Any = None
) -> dict[str, Any]:
    """Run (or resume) every stage and write `summary.json`; returns the summary.

    Under `accelerate launch` / `torchrun` every rank runs this; rank 0 alone writes files.
    """
    t_start = time.perf_counter()
    check_environment(cfg)
    data = load_data(cfg)
    io = prompt_encoder(cfg)
    check_fit(io, context_length(cfg.model.path, cfg.model.trust_remote_code), cfg, data)
    ctx = open_run(cfg, resume, console, io)  # everything above only read: nothing written yet
    model = load_policy(cfg.model, device=ctx.device).eval()
    evaluate_stage(ctx, model, data, "base")
    if cfg.warmup.steps > 0 and cfg.warmup.hinted:  # no gold chains of thought: the model explains the answers
        data.seed_cot = hinted_warmup_set(ctx, model, data.train)
    model, init_dir = warm_up(ctx, model, data)
    prm = run_prm_stages(ctx, model, data, init_dir or cfg.model.path) if cfg.prm.enabled else None
    model, state = evolve(ctx, model, data.train, data.val, init_dir, prm, data.unlabeled)
    ctx.close()
    evaluate_stage(ctx, model, data, "final")
    return write_summary(ctx, state, t_start, resume, extra or {})


# --------------------------------------------------------------------------------- data
def load_data(cfg: Config) -> Data:
    """Every data file of the run, refused when it cannot serve its role."""
    d = cfg.data
    root = d.image_root or None
    if not d.train:
        raise DataError("data.train is empty: give the answer-only training prompts")
    if not d.val:
        raise DataError("data.val is empty: give a validation split for monitoring")
    if cfg.warmup.steps > 0 and not d.seed_cot and not cfg.warmup.hinted:
        raise DataError(
            f"warmup.steps={cfg.warmup.steps} but there is no warm-up set: give data.seed_cot (gold chains of "
            "thought), set warmup.hinted=true (the model explains the gold answers), or warmup.steps=0"
        )
    files = {"train": d.train, "val": d.val, **{f"test {n}": p for n, p in d.test.items()}}
    if d.seed_cot:
        files["seed_cot"] = d.seed_cot
    loaded = {role: _nonempty(load_samples(path, image_root=root), path, role) for role, path in files.items()}
    train, val = loaded["train"][: d.max_train or None], loaded["val"][: d.max_val or None]
    seed_cot = loaded.get("seed_cot", [])
    missing = [s.id for s in seed_cot if not s.rationale]
    if missing:
        raise DataError(f"{d.seed_cot}: warm-up records need a chain of thought; {missing[:3]} have none")
    tests = {name: loaded[f"test {name}"] for name in d.test}
    unlabeled = load_unlabeled(cfg, train) if d.unlabeled else []
    if d.unlabeled:
        files["unlabeled"] = d.unlabeled
    return Data(train, val, tests, seed_cot, files, unlabeled)


def load_unlabeled(cfg: Config, train: list[Sample]) -> list[Sample]:
    """The unlabeled pool, refused when its ids clash with the training prompts' (a kept response
    must name one prompt) or, for the oracle, when a record has no answer."""
    path = cfg.data.unlabeled
    pool = _nonempty(
        load_samples(path, image_root=cfg.data.image_root or None, require_answer=False), path, "unlabeled"
    )
    train_ids = {s.id for s in train}
    clash = [s.id for s in pool if s.id in train_ids]
    if clash:
        raise DataError(
            f"{path}: record ids {clash[:3]} are also ids of data.train ({cfg.data.train}); ids must differ"
        )
    if cfg.evolve.pseudo_label == "oracle":
        missing = next((s for s in pool if s.answer is None), None)
        if missing is not None:
            raise DataError(
                f"{path} record {missing.meta.get('source', '').rpartition(':')[2] or missing.id} (id {missing.id!r}): "
                "field 'answer' is missing, and evolve.pseudo_label=oracle "
                "trains every unlabeled prompt towards its true answer"
            )
    return pool


def _nonempty(samples: list[Sample], path: str, role: str) -> list[Sample]:
    if not samples:
        raise DataError(f"{path}: no records, so it cannot serve as the {role} set")
    return samples


def check_fit(io: VLMInputs, context: int | None, cfg: Config, data: Data) -> None:
    """Refuse prompts (and warm-up targets) that do not fit the model's `context` with
    `gen.max_new_tokens` of room, and images the processor cannot take, before any compute."""
    sets = {"train": data.train, "val": data.val, "seed_cot": data.seed_cot, "unlabeled": data.unlabeled}
    sets.update({f"test {n}": s for n, s in data.tests.items()})
    for role, samples in sets.items():
        room, room_from = cfg.gen.max_new_tokens, ""
        if role == "train" and cfg.prm.enabled:  # a labelling completion continues a whole response
            room += cfg.prm.max_new_tokens
            room_from = f"gen.max_new_tokens={cfg.gen.max_new_tokens} + prm.max_new_tokens={cfg.prm.max_new_tokens}"
        check_prompts_fit(io, context, samples, data.files.get(role, role), room, role, room_from)


def check_prompts_fit(
    io: VLMInputs, context: int | None, samples: list[Sample], path: str, room: int, role: str = "", room_from: str = ""
) -> None:
    """`samples` (from the file at `path`) refused with file, record and field named when a
    prompt plus `room` new tokens exceeds `context` or the processor cannot take an image.

    `role` "seed_cot" checks the gold target instead of `room`, "train" adds the end-of-turn
    tokens an SFT target of a sampled response carries. `room_from` says where `room` comes from
    in the message (default: gen.max_new_tokens)."""
    if context is None:
        return

    def where(sample: Sample) -> str:
        return f"{path} record {str(sample.meta.get('source', '')).rpartition(':')[2]} (id {sample.id!r})"

    for sample in samples:
        try:
            n = io.prompt_length(sample)
        except Exception as err:  # the processor's own errors, of many types
            raise DataError(f"{where(sample)}: field 'image': the processor cannot take it: {err}") from None
        if role == "seed_cot":
            extra, what = len(io.encode_response(sample.target)), "its chain of thought and answer are"
        else:
            extra, what = room + (len(io.turn_end_ids) if role == "train" else 0), "the room for new tokens is"
        if n + extra > context:
            raise DataError(
                f"{where(sample)}: field 'question': the prompt is {n} tokens and {what} {extra} "
                f"({room_from or f'gen.max_new_tokens={room}'}); together more than the model's context of "
                f"{context} tokens (max_position_embeddings)"
            )


# --------------------------------------------------------------------------------- stages
def evaluate_stage(ctx: RunContext, model: torch.nn.Module, data: Data, stage: str) -> None:
    """Greedy accuracy on every test split: the base model before training, or the final one."""
    run = ctx.run
    if not run.done(stage):
        t0 = time.perf_counter()
        res: dict[str, Any] = {"tests": evaluate_tests(ctx, model, data.tests, stage)}
        res["seconds"] = time.perf_counter() - t0
        if stage == "final":
            run.save_checkpoint("final", model, ctx.processor, state={"stage": "final"})
        run.log(stage, **res)
        run.finish(stage, res)
    ctx.say(f"{stage}: {_fmt(run.result(stage)['tests'])}")


def evaluate_tests(ctx: RunContext, model: torch.nn.Module, tests: dict[str, list[Sample]], tag: str) -> dict:
    cfg = ctx.cfg
    return {
        name: evaluate(model, ctx.io, samples, cfg.gen, desc=f"{tag} {name}", progress=cfg.progress)[0]
        for name, samples in tests.items()
    }


def warm_up(ctx: RunContext, model: torch.nn.Module, data: Data) -> tuple[torch.nn.Module, Path | None]:
    """SFT on the warm-up set; its best-validation weights start the loop (and ReST-EM's restarts)."""
    cfg, run = ctx.cfg, ctx.run
    if cfg.warmup.steps == 0:
        return model, None
    if run.done("warmup"):
        model = load_policy(cfg.model, run.checkpoint_dir("warmup"), device=ctx.device)
    else:
        info = warmup(
            model,
            ctx.io,
            data.seed_cot,
            data.val,
            cfg.warmup,
            cfg.gen,
            seed=stage_seed(cfg.seed, "warmup"),
            progress=cfg.progress,
            log=lambda **p: run.log("warmup_curve", **p),
            accelerator=ctx.accelerator,
            run=run,
        )
        t_tests = time.perf_counter()
        info["tests"] = evaluate_tests(ctx, model, data.tests, "warm-up")
        info["seconds"] += time.perf_counter() - t_tests  # training (across resumes) and the tests
        run.save_checkpoint("warmup", model, ctx.processor, state={"stage": "warmup"})
        run.log("warmup", **info)
        run.finish("warmup_curve")
        run.finish("warmup", info)
        WarmupCheckpoint(run).remove()
    result = run.result("warmup")
    ctx.say(f"warm-up: {_fmt(result['tests'])} (best val step {result['best_step']})")
    return model, run.checkpoint_dir("warmup")


def write_summary(ctx: RunContext, state: LoopState, t_start: float, resume: bool, extra: dict) -> dict:
    """`summary.json`: accuracies per stage, the iterations' dynamics, and where time went."""
    run = ctx.run
    stages = [s for s in ("base", "warmup", "final") if run.done(s)]
    stage_seconds = dict(extra.pop("stage_seconds", {}))
    stage_seconds["base_eval"] = run.result("base")["seconds"]
    if run.done("warmup"):
        stage_seconds["warmup"] = run.result("warmup")["seconds"]
    prm_seconds, prm = prm_summary(run) if ctx.cfg.prm.enabled else ({}, None)
    stage_seconds.update(prm_seconds)
    stage_seconds["evolve"] = sum(r["seconds"] for r in state.history)
    stage_seconds["final_eval"] = run.result("final")["seconds"]
    summary = {
        "seed": ctx.cfg.seed,
        "mode": ctx.cfg.evolve.mode,
        "model": ctx.cfg.model.path,
        "wall_seconds": sum(stage_seconds.values()),
        "process_seconds": time.perf_counter() - t_start,
        "resumed": resume,
        "stage_seconds": stage_seconds,
        "accuracy": {s: _per_test(run.result(s)["tests"], "accuracy") for s in stages},
        "steps_all_correct": {s: _per_test(run.result(s)["tests"], "steps_all_correct") for s in stages},
        "warmup": {k: v for k, v in (run.result("warmup") or {}).items() if k != "tests"},
        **({"hinted_warmup": run.result("hinted")} if run.done("hinted") else {}),
        **({"prm": prm} if prm is not None else {}),
        "temperatures": [r["temperature"] for r in state.history],
        "iterations": state.history,
        "run_dir": str(run.root),
        **extra,
    }
    if ctx.main:
        atomic_write_json(run.root / "summary.json", summary)
    return summary


def _per_test(tests: dict[str, dict], key: str) -> dict[str, Any]:
    return {name: m[key] for name, m in tests.items()}


def _fmt(tests: dict[str, dict]) -> str:
    return ", ".join(f"{name} {100 * m['accuracy']:.1f}%" for name, m in tests.items())
