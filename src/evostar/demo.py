"""`evostar demo`: the whole recipe on the gym with a tiny model, on a 2-core CPU.

gym -> tiny random-init Qwen2-VL -> base eval -> warm-up on 300 gold chains of thought -> continuous
self-evolving on answer-only prompts -> final eval. The seed set is the only gold reasoning the
model ever sees; every later gain comes from its own rationales.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from evostar.config import Config, build_config
from evostar.rundir import RunDir

# Arithmetic-heavy: its steps are where a tiny model's reasoning goes wrong, and a right answer
# there rarely comes by luck. Comparisons (multiple choice, right one time in three by guessing)
# and bar charts mostly reach their right answers through wrong steps at this scale: kept as
# correct, they teach the loop wrong chains, so they are a small share here (see the README).
GYM_FAMILIES = (("arith", 0.9), ("compare", 0.05), ("bars", 0.05))

# Shared by the presets. The warm-up runs at a constant LR and keeps its best validation
# checkpoint (a decaying LR flattens the validation curve early only because the LR runs out);
# its length is at the plateau of this recipe (docs/experiments.md). The loop samples K=4 at
# T=1.0 from a copy of the policy (bf16 where the CPU has bf16 matrix units) in two single-thread
# processes; its peak LR is low because the memorised warm-up model is fragile.
_WARMUP = {"optim": {"schedule": "constant", "weight_decay": 0.1}}
_GEN = {"k": 4, "temperature": 1.0, "max_new_tokens": 48, "workers": 2}
_EVOLVE_OPTIM = {"lr": 2e-4, "weight_decay": 0.0}
# The paper's final row: PRM top-2 among the correct responses, the temperature re-chosen every
# two iterations by Reward-Pass@2 on validation. The PRM is trained once, after warm-up, on
# Monte-Carlo labels of the warm-up policy's own responses (docs/prm.md).
_PRM = {"enabled": True, "collect_k": 4, "n_completions": 8, "max_new_tokens": 48}
_MSTAR = {"evolve": {"selection": "top_k", "select_k": 2}, "adapt": {"controller": "reward_pass", "every": 2}}

# Every preset is a set of config overrides plus the gym's sizes.
PRESETS: dict[str, dict[str, Any]] = {
    # A few seconds of everything, for tests and CI; it shows no gain.
    "smoke": {
        "gym": {"n_seed": 32, "n_train": 48, "n_val": 16, "n_test_id": 16, "n_test_ood": 16},
        "config": {
            "warmup": {"steps": 20, "eval_every": 10, "optim": {"batch_size": 8}},
            "evolve": {
                "iterations": 3,
                "interval": 0.34,
                "steps_per_iteration": 4,
                "optim": {"batch_size": 8},
                **_MSTAR["evolve"],
            },
            # In-process sampling: a worker's start (a spawned process importing torch and
            # transformers) would outweigh the sampling it does at this size; tests/test_pool.py
            # runs the pool.
            "gen": {**_GEN, "max_new_tokens": 40, "workers": 1},
            "eval": {"pass_k": 2},
            "prm": {**_PRM, "collect_prompts": 8, "max_new_tokens": 40, "steps": 4, "optim": {"batch_size": 8}},
            "adapt": {**_MSTAR["adapt"], "t_min": 0.6, "t_max": 1.2, "t_step": 0.3, "prompts": 8},
        },
    },
    "quick": {
        "gym": {
            "n_seed": 300,
            "n_train": 2000,
            "n_val": 150,
            "n_test_id": 250,
            "n_test_ood": 250,
            "ood_style_strength": 0.5,
        },
        "config": {
            # Too short for the warm-up's plateau (docs/experiments.md): part of this preset's gain is
            # what a longer warm-up would give too.
            "warmup": {"steps": 450, "eval_every": 150, **_WARMUP},
            "evolve": {"iterations": 5, "interval": 0.25, "optim": _EVOLVE_OPTIM, **_MSTAR["evolve"]},
            "gen": _GEN,
            "eval": {"pass_k": 4, "pass_prompts": 0, "pass_temperature": None},
            "prm": {**_PRM, "collect_prompts": 128, "steps": 150},
            "adapt": {**_MSTAR["adapt"], "prompts": 100},
        },
    },
    "default": {
        "gym": {
            "n_seed": 300,
            "n_train": 4000,
            "n_val": 250,
            "n_test_id": 500,
            "n_test_ood": 500,
            "ood_style_strength": 0.5,
        },
        "config": {
            "warmup": {"steps": 1500, "eval_every": 250, **_WARMUP},
            "evolve": {"iterations": 6, "interval": 0.25, "optim": _EVOLVE_OPTIM, **_MSTAR["evolve"]},
            "gen": _GEN,
            "eval": {"pass_k": 4, "pass_prompts": 0, "pass_temperature": None},
            "prm": {**_PRM, "collect_prompts": 256, "steps": 200},
            "adapt": {**_MSTAR["adapt"], "prompts": 250},
        },
    },
}


def demo_config(preset: str, out: Path, seed: int, overrides: list[str]) -> Config:
    """The preset's config for a run in `out`, with `key=value` overrides on top."""
    from evostar.config import ConfigError, deep_update

    if preset not in PRESETS:
        raise ConfigError(f"--preset {preset!r}: choose one of {sorted(PRESETS)}")
    from evostar.launch import cpu_has_bf16

    data_dir = out / "data"
    base: dict[str, Any] = {}
    deep_update(base, PRESETS[preset]["config"])
    if cpu_has_bf16():
        # bf16 matrix units: SFT and PRM training and scoring under bf16 autocast (weights and
        # AdamW in float32) and a bf16 sampling copy. Without them bf16 is emulated and several
        # times slower than float32.
        deep_update(
            base,
            {
                "warmup": {"optim": {"autocast": "bf16"}},
                "evolve": {"optim": {"autocast": "bf16"}},
                "gen": {"rollout_dtype": "bfloat16"},
                "prm": {"optim": {"autocast": "bf16"}, "score_autocast": "bf16"},
            },
        )
    deep_update(
        base,
        {
            "output_dir": str(out),
            "seed": seed,
            "threads": min(2, torch.get_num_threads()) or 1,
            "model": {"path": str(out / "model_init")},
            "data": {
                "train": str(data_dir / "train.json"),
                "val": str(data_dir / "val.json"),
                "seed_cot": str(data_dir / "seed.json"),
                "test": {"test_id": str(data_dir / "test_id.json"), "test_ood": str(data_dir / "test_ood.json")},
            },
        },
    )
    return build_config(base, overrides)


def parse_mix(text: str) -> tuple[tuple[str, float], ...]:
    """`arith=0.7,compare=0.15,bars=0.15` as gym families and weights, or a ConfigError."""
    from evostar.config import ConfigError
    from evostar.data.gym import TEMPLATES

    mix = []
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        name, eq, weight = part.partition("=")
        try:
            value = float(weight)
        except ValueError:
            value = float("nan")
        if not eq or name.strip() not in TEMPLATES or not value >= 0:
            raise ConfigError(
                f"--mix {text!r}: {part!r} is not family=weight with a family of {sorted(TEMPLATES)} and a weight >= 0"
            )
        mix.append((name.strip(), value))
    if not mix or len({n for n, _ in mix}) < len(mix) or sum(w for _, w in mix) <= 0:
        raise ConfigError(f"--mix {text!r}: name each family once, with weights that sum above 0")
    return tuple(mix)


def gym_texts(data_dir: Path) -> list[str]:
    """Text the tiny tokenizer is trained on: questions, gold chains of thought, chat scaffolding."""
    texts = ["user\nassistant\n", "# Answer\n\n"]
    for name in ("seed", "train"):
        for rec in json.loads((data_dir / f"{name}.json").read_text()):
            texts += [c["value"].replace("<image>\n", "") for c in rec["conversations"]]
    return texts


def run_demo(
    preset: str,
    out: Path,
    seed: int = 0,
    resume: bool = False,
    progress: bool = True,
    overrides: Sequence[str] = (),
    console: Any = None,
    mix: Sequence[tuple[str, float]] | None = None,
    n_unlabeled: int = 0,
) -> dict[str, Any]:
    """Build the gym (families `mix`, the preset's by default; `n_unlabeled` prompts of its
    unlabeled split) and a tiny Qwen2-VL in `out`, then run the whole recipe on them."""
    from evostar.context import check_same_run
    from evostar.data.gym import build_gym
    from evostar.models.tiny import build_tiny_qwen2_vl
    from evostar.pipeline import run_experiment

    out = Path(out)
    cfg = demo_config(preset, out, seed, list(overrides))
    cfg.progress = progress
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if resume:
        check_same_run(out, cfg)
    run = RunDir(out, resume=resume)
    families = [[name, float(w)] for name, w in (mix or PRESETS[preset].get("families", GYM_FAMILIES))]
    setup = dict(run.result("setup") or {})
    if run.done("setup") and setup.get("families", families) != families:
        from evostar.errors import RunDirError

        raise RunDirError(f"{out}: its gym was built with --mix {setup['families']}, not {families}")
    stage_seconds = {k: v for k, v in setup.items() if k != "families"}
    if not run.done("setup"):
        t0 = time.perf_counter()
        if console is not None:
            console.print(f"[bold]evostar demo[/] preset={preset} seed={seed} → {out}")
        build_gym(
            out / "data",
            seed=seed,
            families=[tuple(f) for f in families],
            n_unlabeled=n_unlabeled,
            **PRESETS[preset]["gym"],
        )
        stage_seconds["gym"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        build_tiny_qwen2_vl(gym_texts(out / "data"), out / "model_init", seed=seed)
        stage_seconds["model"] = time.perf_counter() - t0
        run.log("setup", **stage_seconds, families=families)
        run.finish("setup", {**stage_seconds, "families": families})
    summary = run_experiment(
        cfg,
        resume=True,
        extra={"preset": preset, "gym_mix": dict(families), "stage_seconds": stage_seconds, "resumed": resume},
        console=console,
    )
    from evostar.report import write_report

    page = write_report(out)
    if console is not None:
        console.print(f"report: {page}")
    return summary
