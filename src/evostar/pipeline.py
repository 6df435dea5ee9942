"""A whole experiment as resumable stages: base eval -> warm-up -> self-evolving -> final eval.

`evostar evolve` and `evostar demo` both end here, so the gym and real data share one path.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from evostar.config import Config, dump_yaml
from evostar.data.loaders import load_samples
from evostar.evaluate import evaluate
from evostar.evolve import evolve
from evostar.models.hub import load_policy, load_processor
from evostar.models.inputs import VLMInputs
from evostar.records import Sample
from evostar.rollout import make_rollout
from evostar.rundir import RunDir, atomic_write_json, atomic_write_text, stage_seed
from evostar.train import warmup


@dataclass
class Data:
    train: list[Sample]
    val: list[Sample]
    tests: dict[str, list[Sample]]
    seed_cot: list[Sample]


def load_data(cfg: Config) -> Data:
    d = cfg.data
    root = d.image_root or None
    if not d.train:
        raise ValueError("config: data.train is empty: give the answer-only training prompts")
    if not d.val:
        raise ValueError("config: data.val is empty: give a validation split for monitoring")
    train = load_samples(d.train, image_root=root)
    val = load_samples(d.val, image_root=root)
    if d.max_train:
        train = train[: d.max_train]
    if d.max_val:
        val = val[: d.max_val]
    tests = {name: load_samples(path, image_root=root) for name, path in d.test.items()}
    seed_cot = load_samples(d.seed_cot, image_root=root) if d.seed_cot else []
    missing = [s.id for s in seed_cot if not s.rationale]
    if missing:
        raise ValueError(f"{d.seed_cot}: warm-up records need a chain of thought; {missing[:3]} have none")
    return Data(train, val, tests, seed_cot)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def check_config(cfg: Config) -> None:
    """Refuse bad choices before any compute is spent (a GPU run may be hours in otherwise)."""
    from evostar.config import ConfigError
    from evostar.evolve import MODES
    from evostar.rollout import BACKENDS
    from evostar.select import STRATEGIES
    from evostar.train import autocast_dtype

    choices = {
        "evolve.mode": (cfg.evolve.mode, MODES),
        "evolve.selection": (cfg.evolve.selection, STRATEGIES),
        "gen.backend": (cfg.gen.backend, BACKENDS),
        "evolve.optim.schedule": (cfg.evolve.optim.schedule, ("constant", "linear", "cosine")),
        "warmup.optim.schedule": (cfg.warmup.optim.schedule, ("constant", "linear", "cosine")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key}={value!r}: choose one of {list(allowed)}")
    if cfg.gen.workers < 1:
        raise ConfigError(f"gen.workers={cfg.gen.workers}: at least 1")
    if cfg.gen.workers > 1 or cfg.gen.rollout_dtype:
        from evostar.distributed import launched_distributed

        if cfg.gen.backend != "hf":
            raise ConfigError("gen.workers / gen.rollout_dtype are options of gen.backend=hf")
        if launched_distributed() or resolve_device(cfg.device).type != "cpu":
            raise ConfigError(
                "gen.workers / gen.rollout_dtype are for one process on CPU; under torchrun / "
                "accelerate every rank already samples its shard, and a GPU run uses gen.backend=vllm"
            )
        if cfg.gen.rollout_dtype and not isinstance(getattr(torch, cfg.gen.rollout_dtype, None), torch.dtype):
            raise ConfigError(f"gen.rollout_dtype={cfg.gen.rollout_dtype!r}: a torch dtype such as bfloat16")
    if not 0 < cfg.evolve.interval <= 1:
        raise ConfigError(f"evolve.interval={cfg.evolve.interval}: a share of the prompts in (0, 1]")
    for key, optim in (("warmup.optim", cfg.warmup.optim), ("evolve.optim", cfg.evolve.optim)):
        try:
            autocast_dtype(optim.autocast)
        except ValueError as err:
            raise ConfigError(f"{key}.autocast: {err}") from None


def evaluate_tests(model, io, tests: dict[str, list[Sample]], cfg: Config, tag: str) -> dict[str, Any]:
    out = {}
    for name, samples in tests.items():
        metrics, _ = evaluate(model, io, samples, cfg.gen, desc=f"{tag} {name}", progress=cfg.progress)
        out[name] = metrics
    return out


def run_experiment(
    cfg: Config, resume: bool = False, extra: dict[str, Any] | None = None, console=None
) -> dict[str, Any]:
    """Run (or resume) every stage and write `summary.json`; returns the summary.

    Under `accelerate launch` / `torchrun` every rank runs this; rank 0 alone writes files.
    """
    from evostar.distributed import SharedRunDir, maybe_accelerator

    t_start = time.perf_counter()
    check_config(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # Tiny gradients and Adam moments decay into denormal floats, which run ~10x slower on CPU.
    torch.set_flush_denormal(True)
    accelerator = maybe_accelerator(cfg)  # None on one process
    main = accelerator is None or accelerator.is_main_process
    cfg.progress = cfg.progress and main
    run = SharedRunDir(cfg.output_dir, accelerator, resume=resume) if accelerator else RunDir(cfg.output_dir, resume=resume)
    if main:
        atomic_write_text(run.root / "config.yaml", dump_yaml(cfg))
    device = accelerator.device if accelerator else resolve_device(cfg.device)
    data = load_data(cfg)
    processor = load_processor(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    model = load_policy(cfg.model, device=device).eval()
    io = VLMInputs(processor, cfg.model.prompt_template, cfg.model.system_prompt or None)
    say = console.print if console is not None and main else (lambda *a, **k: None)
    backend = make_rollout(cfg)  # sampling for the hinted warm-up and the loop (built on first use)

    # Base model, before any training.
    if not run.done("base"):
        t0 = time.perf_counter()
        res = {"tests": evaluate_tests(model, io, data.tests, cfg, "base"), "seconds": time.perf_counter() - t0}
        run.log("base", **res)
        run.finish("base", res)
    say(f"base: {_fmt(run.result('base')['tests'])}")

    # No gold chains of thought: the base model explains the gold answers (evostar.hinted).
    if cfg.warmup.steps > 0 and not data.seed_cot and cfg.warmup.hinted:
        data.seed_cot = hinted_warmup_set(cfg, run, model, io, data.train, accelerator, backend)
        hinted = run.result("hinted")
        say(f"hinted warm-up set: {hinted['kept']} responses for {hinted['kept_prompts']} of "
            f"{hinted['prompts']} prompts")  # fmt: skip

    # Warm-up on the gold chains of thought; its best-validation weights start the loop.
    init_dir: Path | None = None
    if cfg.warmup.steps > 0 and data.seed_cot:
        if run.done("warmup"):
            model = load_policy(cfg.model, run.checkpoint_dir("warmup"), device=device)
        else:
            t0 = time.perf_counter()
            info = warmup(
                model, io, data.seed_cot, data.val, cfg.warmup, cfg.gen, seed=stage_seed(cfg.seed, "warmup"),
                progress=cfg.progress, log=lambda **p: run.log("warmup_curve", **p), accelerator=accelerator,
            )  # fmt: skip
            info["tests"] = evaluate_tests(model, io, data.tests, cfg, "warm-up")
            info["seconds"] = time.perf_counter() - t0
            run.save_checkpoint("warmup", model, processor, state={"stage": "warmup"})
            run.log("warmup", **info)
            run.finish("warmup_curve")
            run.finish("warmup", info)
        init_dir = run.checkpoint_dir("warmup")
        say(f"warm-up: {_fmt(run.result('warmup')['tests'])} (best val step {run.result('warmup')['best_step']})")

    # Self-evolving.
    model, state = evolve(cfg, run, model, processor, io, data.train, data.val, init_dir, accelerator, backend)
    if hasattr(backend, "close"):
        backend.close()  # a vLLM engine's GPU memory, a CPU pool's worker processes
    evolve_seconds = sum(r["seconds"] for r in state.history)

    # Final evaluation.
    if not run.done("final"):
        t0 = time.perf_counter()
        res = {"tests": evaluate_tests(model, io, data.tests, cfg, "final")}
        res["seconds"] = time.perf_counter() - t0
        run.save_checkpoint("final", model, processor, state={"stage": "final"})
        run.log("final", **res)
        run.finish("final", res)
    say(f"final: {_fmt(run.result('final')['tests'])}")

    stage_seconds = dict((extra or {}).pop("stage_seconds", {}))
    stage_seconds["base_eval"] = run.result("base")["seconds"]
    if run.done("warmup"):
        stage_seconds["warmup"] = run.result("warmup")["seconds"]
    stage_seconds["evolve"] = evolve_seconds
    stage_seconds["final_eval"] = run.result("final")["seconds"]
    accuracy = {"base": _acc(run.result("base")["tests"])}
    if run.done("warmup"):
        accuracy["warmup"] = _acc(run.result("warmup")["tests"])
    accuracy["final"] = _acc(run.result("final")["tests"])
    summary = {
        "seed": cfg.seed,
        "mode": cfg.evolve.mode,
        "model": cfg.model.path,
        "wall_seconds": sum(stage_seconds.values()),
        "process_seconds": time.perf_counter() - t_start,
        "resumed": resume,
        "stage_seconds": stage_seconds,
        "accuracy": accuracy,
        "steps_all_correct": {
            "base": _steps(run.result("base")["tests"]),
            **({"warmup": _steps(run.result("warmup")["tests"])} if run.done("warmup") else {}),
            "final": _steps(run.result("final")["tests"]),
        },
        "warmup": {k: v for k, v in (run.result("warmup") or {}).items() if k != "tests"},
        **({"hinted_warmup": run.result("hinted")} if run.done("hinted") else {}),
        "iterations": [
            {
                "iteration": r["iteration"],
                "prompts": r["prompts"],
                "responses": r["responses"],
                "kept": r["kept"],
                "val_accuracy": r["val_accuracy"],
                "val_pass_at_k": r["val_pass_at_k"],
                "temperature": r["temperature"],
                "seconds": r["seconds"],
                "kept_steps_all_correct": r["kept_steps_all_correct"],
                "sft_loss": r["sft_loss"],
            }
            for r in state.history
        ],
        "run_dir": str(run.root),
        **(extra or {}),
    }
    if main:
        atomic_write_json(run.root / "summary.json", summary)
    return summary


def hinted_warmup_set(
    cfg: Config, run: RunDir, model, io: VLMInputs, train: list[Sample], accelerator=None, backend=None
) -> list[Sample]:
    """The warm-up set generated with the gold answer in the prompt (`evostar.hinted`).

    Written to RUN/warmup_set.json (MathV360K format) and read back on resume, so a resumed run
    trains on exactly the same set. Targets never contain the hint: they are the original
    prompts with the generated steps and the gold answer.
    """
    import functools

    from evostar.distributed import generate_sharded
    from evostar.hinted import build_warmup_set, pick_prompts, warmup_records

    path = run.root / "warmup_set.json"
    if run.done("hinted"):
        return load_samples(path)
    t0 = time.perf_counter()
    w = cfg.warmup
    backend = backend or make_rollout(cfg)
    rollout = backend if accelerator is None else functools.partial(generate_sharded, accelerator, generate_fn=backend)
    prompts = pick_prompts(train, w.hinted_max_prompts, seed=stage_seed(cfg.seed, "hinted-prompts"))
    kept, stats = build_warmup_set(
        model, io, prompts, k=w.hinted_k, temperature=w.hinted_temperature,
        max_new_tokens=cfg.gen.max_new_tokens, batch_size=cfg.gen.batch_size,
        seed=stage_seed(cfg.seed, "hinted"), keep_per_prompt=w.hinted_keep_per_prompt,
        generate_fn=rollout, progress=cfg.progress,
    )  # fmt: skip
    stats["seconds"] = time.perf_counter() - t0
    if accelerator is None or accelerator.is_main_process:
        atomic_write_text(path, json.dumps(warmup_records(kept)))
    run.log("hinted", **stats)
    run.finish("hinted", stats)  # [distributed] a barrier: the file exists for every rank after it
    return kept


def _acc(tests: dict[str, dict]) -> dict[str, float]:
    return {name: m["accuracy"] for name, m in tests.items()}


def _steps(tests: dict[str, dict]) -> dict[str, float | None]:
    return {name: m["steps_all_correct"] for name, m in tests.items()}


def _fmt(tests: dict[str, dict]) -> str:
    return ", ".join(f"{name} {100 * m['accuracy']:.1f}%" for name, m in tests.items())
