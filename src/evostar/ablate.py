"""`evostar ablate`: the paper's Tables 1-3 and its final recipe re-run on the gym, over seeds.

Per seed, one shared run builds the gym, the tiny model, the warm-up and the PRM (the demo's
stages with no loop iteration); every loop row is a fork of it (`evostar fork`) that changes only
the factor under study, so rows differ by that factor and not by their warm-up. Two peer rows
leave the loop: SFT on the seed chains of thought alone and TRL's GRPO, both from the warm-up
checkpoint for the wall-clock of the full recipe (its PRM stages and loop), each with the best
value of a small grid searched on the first seed. Every row is a run directory, so a killed
ablation resumes and skips finished rows. Findings are judged by one stated rule over seeds
(`RULE`), never by eye: `findings()` recomputes them from the rows in `table.json`.
"""

from __future__ import annotations

import gc
import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from evostar.config import Config, ConfigError, build_config, dump_yaml, to_dict
from evostar.errors import RunDirError
from evostar.rundir import atomic_write_json, atomic_write_text, read_json

__all__ = ["ABLATE_PRESETS", "ROWS", "RULE", "findings", "run_ablation", "table_markdown"]

RULE = (
    "A difference between two rows is the mean over seeds of the per-seed difference (rows of one seed share "
    "their gym, warm-up and PRM, so differences are paired); it counts when its magnitude exceeds twice its "
    "standard error (sample std / sqrt(seeds)). With fewer than 2 seeds no difference counts and every "
    "finding is 'not distinguishable'. A claim that one row beats another is reproduced only when the difference counts "
    "in its direction; a claim that one does not beat another is reproduced unless the difference counts "
    "against it (with 2 seeds or more). Accuracies are test-ID (and test-OOD where said), in points."
)


@dataclass(frozen=True)
class Row:
    name: str
    kind: str = "loop"
    """loop (a fork of the shared run), stage (a stage of the shared run), sft or grpo."""
    overrides: dict[str, Any] = field(default_factory=dict)
    paper: tuple[float | None, float | None] = (None, None)
    """The paper's MathV360K-ID / MathVista numbers for the row (recipe.md), where it gives them."""
    what: str = ""


_TOP2 = {"evolve.selection": "top_k", "evolve.select_k": 2}
_UNLABELED = {**_TOP2, "data.unlabeled": "{data}/unlabeled.json"}
ROWS: tuple[Row, ...] = (
    Row("base", "stage", paper=(13.6, 52.4), what="the tiny random-init model"),
    Row("warmup", "stage", paper=(38.8, 52.6), what="SFT on the gold seed chains of thought, best val step"),
    Row("sft_equal_compute", "sft", paper=(44.3, 54.8), what="more SFT on the seed set for the recipe's wall-clock"),
    Row("iterative_rft", overrides={"evolve.mode": "iterative_rft"}, paper=(42.3, 55.7), what="optimizer re-created"),
    Row("rest_em", overrides={"evolve.mode": "rest_em"}, paper=(42.3, 55.1), what="restart from warm-up"),
    Row("continuous_100", overrides={"evolve.interval": 1.0, "evolve.iterations": 1}, paper=(42.2, 56.7)),
    Row("continuous_50", overrides={"evolve.interval": 0.5, "evolve.iterations": 2}, paper=(43.1, 56.2)),
    Row(
        "continuous_25",
        overrides={"eval.pass_k": 4},
        paper=(43.1, 57.2),
        what="all correct responses, T=1.0: the rows below change one thing",
    ),
    Row("continuous_12.5", overrides={"evolve.interval": 0.125, "evolve.iterations": 8}, paper=(42.3, 56.1)),
    Row("prm_top1", overrides={"evolve.selection": "top_k", "evolve.select_k": 1}, paper=(43.0, 59.0)),
    Row("prm_top2", overrides=_TOP2, paper=(45.3, 59.2)),
    Row("prm_top4", overrides={"evolve.selection": "top_k", "evolve.select_k": 4}, paper=(44.0, 58.4)),
    Row("prm_threshold", overrides={"evolve.selection": "threshold"}, paper=(43.8, 57.5), what="PRM score > α"),
    Row("random2", overrides={"evolve.selection": "random_k", "evolve.select_k": 2}, paper=(41.0, 55.5)),
    Row(
        "mstar",
        overrides={**_TOP2, "adapt.controller": "reward_pass"},
        paper=(45.9, 59.5),
        what="PRM top-2 + T by Reward-Pass@2 every 2 iterations: the final M-STaR recipe",
    ),
    Row("adapt_pass_at_k", overrides={**_TOP2, "adapt.controller": "pass_at_k"}, paper=(42.8, 58.0)),
    Row(
        "unlabeled_oracle",
        overrides={**_UNLABELED, "evolve.pseudo_label": "oracle"},
        paper=(42.9, 59.1),
        what="PRM top-2 with unlabeled prompts given their true answers",
    ),
    Row("unlabeled_prm_0", overrides={**_UNLABELED, "evolve.pseudo_label": "prm_weighted"}, what="mixed in from 0%"),
    Row(
        "unlabeled_prm_75",
        overrides={**_UNLABELED, "evolve.pseudo_label": "prm_weighted", "evolve.unlabeled_from": 0.75},
        what="mixed in after 75% of the iterations",
    ),
    Row("grpo_equal_wallclock", "grpo", what="TRL GRPOTrainer from the warm-up for the recipe's wall-clock"),
)
ROW_NAMES = tuple(r.name for r in ROWS)
_BY_NAME = {r.name: r for r in ROWS}
FULL_RECIPE = "mstar"
"""The row whose wall-clock (PRM stages and loop) the SFT and GRPO rows get."""

# Each ablation preset is a demo preset plus the loop every row starts from: continuous, 25% of the
# prompts per iteration for one pass over them (the interval rows keep the pass: equal data and
# generation), all correct responses kept, static T=1.0.
ABLATE_PRESETS: dict[str, dict[str, Any]] = {
    # Seconds per row, for tests and CI: no finding means anything at this size.
    "smoke": {
        "demo": "smoke",
        "loop": {"evolve.iterations": 4, "evolve.interval": 0.25, "evolve.steps_per_iteration": 2},
        "unlabeled": 16,
        "sft_weight_decay": (0.0, 0.1),
        "grpo_lr": (1e-4, 1e-3),
        # the peers get a quarter of the recipe's seconds: the budget's arithmetic is what is tested
        "peer_budget_share": 0.25,
    },
    "quick": {
        "demo": "quick",
        "loop": {"evolve.iterations": 4, "evolve.interval": 0.25, "adapt.prompts": 100, "adapt.t_step": 0.2},
        "unlabeled": 1000,
        "sft_weight_decay": (0.0, 0.1),
        "grpo_lr": (2e-5, 5e-5),
    },
    "default": {
        "demo": "default",
        "loop": {"evolve.iterations": 4, "evolve.interval": 0.25, "adapt.prompts": 250},
        "unlabeled": 2000,
        "sft_weight_decay": (0.0, 0.1),
        "grpo_lr": (2e-5, 5e-5, 1e-4),
    },
}
# Pass@K on val each iteration only where a finding reads it (F4, continuous_25): elsewhere it would
# be most of an iteration's time at this scale and change nothing the table reports.
_SHARED_LOOP = {"evolve.selection": "all", "adapt.controller": "static", "gen.temperature": 1.0, "eval.pass_k": 0}


def _kv(d: dict[str, Any], data_dir: Path | str) -> list[str]:
    return [f"{k}={str(v).replace('{data}', str(data_dir))}" for k, v in d.items()]


def shared_overrides(preset: str) -> list[str]:
    """Overrides of the demo preset for the shared run: the rows' common loop, zero iterations."""
    loop = {**_SHARED_LOOP, **ABLATE_PRESETS[preset]["loop"], "evolve.iterations": 0}
    return _kv(loop, "")


def row_overrides(preset: str, row: Row, data_dir: Path | str) -> list[str]:
    """What a loop row's fork sets on top of the shared run's config."""
    return _kv({"evolve.iterations": ABLATE_PRESETS[preset]["loop"]["evolve.iterations"], **row.overrides}, data_dir)


def check_rows(rows: Sequence[str] | None) -> list[str]:
    """Row names in table order (all by default), or a ConfigError naming the unknown ones."""
    if not rows:
        return list(ROW_NAMES)
    unknown = [r for r in rows if r not in _BY_NAME]
    if unknown:
        raise ConfigError(f"--rows: {unknown} are not rows; choose from {list(ROW_NAMES)}")
    return [r for r in ROW_NAMES if r in rows]


# --------------------------------------------------------------------------------- running
@dataclass
class Ablation:
    preset: str
    out: Path
    seeds: list[int]
    rows: list[str]
    progress: bool = False
    say: Callable[[str], None] = print
    results: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)
    """row -> seed -> {test_id, test_ood, wall_seconds, ...}."""
    grids: dict[str, dict[str, Any]] = field(default_factory=dict)
    measures: dict[int, dict[str, Any]] = field(default_factory=dict)

    def seed_dir(self, seed: int) -> Path:
        return self.out / f"seed{seed}"


def run_ablation(
    preset: str,
    out: Path,
    seeds: int = 1,
    rows: Sequence[str] | None = None,
    resume: bool = False,
    progress: bool = False,
    say: Callable[[str], None] = print,
    jobs: int = 1,
) -> dict[str, Any]:
    """Run (or resume) every row on seeds 0..seeds-1 and write `table.json`, `table.md` and the
    table's plot in `out`; returns the table. `jobs` > 1 runs the loop rows other than the full
    recipe in that many single-thread processes at once (`run_side_by_side`)."""
    if preset not in ABLATE_PRESETS:
        raise ConfigError(f"--preset {preset!r}: choose one of {sorted(ABLATE_PRESETS)}")
    if seeds < 1:
        raise ConfigError(f"--seeds {seeds}: give at least 1")
    if jobs < 1:
        raise ConfigError(f"--jobs {jobs}: give at least 1")
    out = Path(out)
    state_path = out / "ablation.json"
    chosen = check_rows(rows)
    if out.exists() and any(out.iterdir()):
        if not resume:
            raise RunDirError(f"{out}: exists and is not empty; pass --resume to continue it, or a new --out")
        if not state_path.exists():
            raise RunDirError(f"{out}: no ablation.json, so it is not an ablation to resume")
        saved = read_json(state_path, "ablation state")
        if saved.get("preset") != preset:
            raise RunDirError(f"{out}: was run with --preset {saved.get('preset')}, not {preset}")
    else:
        saved = {"preset": preset, "wall_seconds": 0.0}
    if "grpo_equal_wallclock" in chosen:
        import importlib.util

        if importlib.util.find_spec("trl") is None:  # before hours of other rows, not after
            raise ConfigError(
                "the grpo_equal_wallclock row runs TRL's GRPOTrainer: pip install 'evostar[ablate]', "
                "or leave the row out with --rows"
            )
    t0 = time.perf_counter()
    before = float(saved.get("wall_seconds", 0.0))
    out.mkdir(parents=True, exist_ok=True)

    def save_state() -> None:
        atomic_write_json(state_path, {"preset": preset, "wall_seconds": before + time.perf_counter() - t0})

    save_state()
    ab = Ablation(preset, out, list(range(seeds)), chosen, progress, say)
    for seed in ab.seeds:
        shared = run_shared(ab, seed)
        # The full recipe first: the SFT and GRPO rows are given its wall-clock.
        order = sorted(chosen, key=lambda n: (n not in (FULL_RECIPE,), ROW_NAMES.index(n)))
        if any(_BY_NAME[n].kind in ("sft", "grpo") for n in chosen) and FULL_RECIPE not in order:
            order.insert(0, FULL_RECIPE)
        if jobs > 1:
            # The full recipe alone on the whole machine (its seconds are the peers' budget, so
            # they must not depend on what else runs), then the other loop rows and the SFT runs
            # (a step count from that budget) side by side; the loop below reads them back and
            # runs GRPO, whose budget is wall-clock, alone.
            if FULL_RECIPE in order:
                ab.results.setdefault(FULL_RECIPE, {})[seed] = run_row(ab, _BY_NAME[FULL_RECIPE], seed, shared)
                save_state()
            run_side_by_side(ab, seed, shared, [n for n in order if n != FULL_RECIPE], jobs)
        for name in order:
            ab.results.setdefault(name, {})[seed] = run_row(ab, _BY_NAME[name], seed, shared)
            save_state()
            gc.collect()
        ab.measures[seed] = seed_measures(ab, seed, shared)
    table = make_table(ab, wall_seconds=before + time.perf_counter() - t0)
    save_state()
    write_table(out, table)
    return table


def run_shared(ab: Ablation, seed: int) -> Path:
    """The seed's gym, model, base evaluation, warm-up and PRM: the demo's stages, no iteration."""
    from evostar.demo import run_demo

    shared = ab.seed_dir(seed) / "shared"
    if (shared / "summary.json").exists():
        return shared
    ab.say(f"seed {seed}: shared stages (gym, base model, warm-up, PRM) → {shared}")
    resume = shared.exists() and any(shared.iterdir())
    run_demo(
        ABLATE_PRESETS[ab.preset]["demo"],
        shared,
        seed=seed,
        resume=resume,
        progress=ab.progress,
        overrides=shared_overrides(ab.preset),
        n_unlabeled=ABLATE_PRESETS[ab.preset]["unlabeled"],
    )
    return shared


def _summary(run_dir: Path) -> dict[str, Any]:
    return read_json(run_dir / "summary.json", "run summary")


def _accuracies(tests: dict[str, float]) -> dict[str, float]:
    return {"test_id": 100 * tests["test_id"], "test_ood": 100 * tests["test_ood"]}


def run_row(ab: Ablation, row: Row, seed: int, shared: Path) -> dict[str, Any]:
    """One row on one seed: its test accuracies (points) and wall-clock seconds."""
    base = _summary(shared)
    if row.kind == "stage":
        secs = base["stage_seconds"]
        wall = secs["base_eval"] + (secs.get("warmup", 0.0) if row.name == "warmup" else 0.0)
        return {**_accuracies(base["accuracy"][row.name]), "wall_seconds": wall}
    if row.kind == "sft":
        return run_sft_row(ab, seed, shared)
    if row.kind == "grpo":
        return run_grpo_row(ab, seed, shared)
    same = alias_of(ab, row, shared)
    if same is not None:  # the same selection as another row: its run, not a second copy of it
        res = dict(ab.results.get(same, {}).get(seed) or run_row(ab, _BY_NAME[same], seed, shared))
        return {**res, "same_as": same}
    summary = run_fork(ab, shared, ab.seed_dir(seed) / row.name, row_overrides(ab.preset, row, shared / "data"))
    return {
        **_accuracies(summary["accuracy"]["final"]),
        "wall_seconds": summary["wall_seconds"],
        "loop_seconds": summary["stage_seconds"]["evolve"],
    }


SIDE_BY_SIDE = ("threads=1", "gen.workers=1")
"""What a row run beside others sets: one thread and no sampler processes of its own."""


def run_side_by_side(ab: Ablation, seed: int, shared: Path, names: Sequence[str], jobs: int) -> None:
    """The loop rows among `names` that are not finished, and the SFT runs of the SFT row when
    it is among them, in `jobs` spawned processes at once, each with one thread (`SIDE_BY_SIDE`).
    One sampler per process instead of the shared run's pool changes the random draws of a row,
    not its recipe; a row resumed later keeps the settings it started with (its fork's config).
    The SFT runs train the step count of their budget whatever else runs."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    todo = []
    for name in names:
        row = _BY_NAME[name]
        dst = ab.seed_dir(seed) / name
        if row.kind == "loop" and alias_of(ab, row, shared) is None and not (dst / "summary.json").exists():
            todo.append((_fork_in_process, (str(shared), str(dst), row_overrides(ab.preset, row, shared / "data"))))
    runs = len(todo)
    if "sft_equal_compute" in names:  # a step budget, not a wall-clock one: it can share the cores
        # first: an SFT run is the longest job, and one started last would leave a core idle
        todo[:0] = [
            (_sft_in_process, (str(shared), str(dst), steps, wd)) for dst, steps, wd in pending_sft(ab, seed, shared)
        ]
    if not todo:
        return
    sft = f" and {len(todo) - runs} SFT runs" if len(todo) > runs else ""
    ab.say(f"seed {seed}: {runs} loop rows{sft} in {jobs} processes side by side")
    with ProcessPoolExecutor(
        max_workers=jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_die_with_parent
    ) as pool:
        running = [pool.submit(fn, *args, ab.progress) for fn, args in todo]
        for job in running:
            job.result()  # a failed row stops the ablation with its error


def _die_with_parent() -> None:
    """A row process ends when the ablation is killed, even by SIGKILL: an orphan would go on
    writing the row's run directory while `--resume` runs it again (Linux; elsewhere a no-op)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _fork_in_process(shared: str, dst: str, overrides: list[str], progress: bool) -> None:
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ab = Ablation("", Path(dst).parent.parent, [], [], progress, say=lambda m: print(m, flush=True))
    run_fork(ab, Path(shared), Path(dst), [*overrides, *SIDE_BY_SIDE])


def _sft_in_process(shared: str, dst: str, steps: int, weight_decay: float, progress: bool) -> None:
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ab = Ablation("", Path(dst).parent.parent, [], [], progress, say=lambda m: print(m, flush=True))
    # threads only: an SFT run never samples, and a resume with --jobs 1 then keeps its config
    run_sft(ab, int(_seed_of(Path(dst))), Path(shared), steps, weight_decay, Path(dst).name, ["threads=1"])


def alias_of(ab: Ablation, row: Row, shared: Path) -> str | None:
    """PRM top-k with k at least the samples per prompt keeps every correct response: the
    all-correct row, continuous_25."""
    if row.overrides.get("evolve.selection") != "top_k":
        return None
    k = _config(shared).gen.k
    return "continuous_25" if row.overrides.get("evolve.select_k", 2) >= k else None


def _config(run_dir: Path) -> Config:
    from evostar.context import with_added_sections

    path = run_dir / "config.yaml"
    return build_config(with_added_sections(yaml.safe_load(path.read_text(encoding="utf-8"))), source=str(path))


def run_fork(ab: Ablation, shared: Path, dst: Path, overrides: list[str]) -> dict[str, Any]:
    """A loop row: fork the shared run into `dst` and run it; a finished one is read, a killed
    one resumed (a fork is complete once its config.yaml is written)."""
    from evostar.fork import fork_run
    from evostar.pipeline import run_experiment

    if (dst / "summary.json").exists():
        return _summary(dst)
    if dst.exists() and not (dst / "config.yaml").exists():
        shutil.rmtree(dst)  # killed while forking: nothing computed yet
    if dst.exists():
        cfg = _config(dst)
        ab.say(f"seed {_seed_of(dst)}: {dst.name} (resumed)")
    else:
        ab.say(f"seed {_seed_of(dst)}: {dst.name}")
        cfg = fork_run(shared, dst, [*overrides, f"progress={str(ab.progress).lower()}"])
    summary = run_experiment(cfg, resume=True, extra={"forked_from": str(shared)})
    _say_row(ab, dst.name, summary["accuracy"]["final"])
    return summary


def _seed_of(path: Path) -> str:
    return path.parent.name.removeprefix("seed")


def _say_row(ab: Ablation, name: str, tests: dict[str, float]) -> None:
    ab.say(f"  {name}: test-ID {100 * tests['test_id']:.1f}, test-OOD {100 * tests['test_ood']:.1f}")


def recipe_budget(ab: Ablation, seed: int, shared: Path) -> float:
    """Seconds the full recipe spent after the warm-up (PRM stages and loop) on this seed: the
    SFT and GRPO rows' budget (times the preset's `peer_budget_share`, 1 but in the smoke preset)."""
    full = ab.results.get(FULL_RECIPE, {}).get(seed) or run_row(ab, _BY_NAME[FULL_RECIPE], seed, shared)
    ab.results.setdefault(FULL_RECIPE, {})[seed] = full
    prm = sum(v for k, v in _summary(shared)["stage_seconds"].items() if k.startswith("prm_"))
    return (prm + full["loop_seconds"]) * ABLATE_PRESETS[ab.preset].get("peer_budget_share", 1.0)


# ----------------------------------------------------------------------- SFT at equal compute
def sft_steps(shared: Path, budget_seconds: float) -> int:
    """Optimizer steps the warm-up's own rate fits in `budget_seconds`: a step count, so a
    resumed row trains exactly as long as an uninterrupted one."""
    warm = _summary(shared)
    rate = _config(shared).warmup.steps / warm["stage_seconds"]["warmup"]
    return max(1, round(rate * budget_seconds))


def sft_decays(ab: Ablation, seed: int) -> list[float]:
    """The weight decays the SFT row trains on this seed: the whole grid on the first seed, the
    one chosen there on the others."""
    grid = ABLATE_PRESETS[ab.preset]["sft_weight_decay"]
    first = ab.seeds[0]
    if seed == first:
        return list(grid)
    return [_chosen(ab, "sft_weight_decay", lambda: run_sft_row(ab, first, ab.seed_dir(first) / "shared"))]


def pending_sft(ab: Ablation, seed: int, shared: Path) -> list[tuple[Path, int, float]]:
    """The SFT runs `run_sft_row` would start on this seed and that are not finished, as (run
    directory, steps, weight decay)."""
    steps = sft_steps(shared, recipe_budget(ab, seed, shared))
    runs = [(ab.seed_dir(seed) / f"sft_wd{wd:g}", steps, wd) for wd in sft_decays(ab, seed)]
    return [run for run in runs if not (run[0] / "summary.json").exists()]


def run_sft_row(ab: Ablation, seed: int, shared: Path) -> dict[str, Any]:
    """SFT on the seed chains of thought alone, from the warm-up checkpoint, for the full
    recipe's post-warm-up wall-clock; the weight decay of the grid with the best validation
    accuracy on the first seed, used for every seed."""
    steps = sft_steps(shared, recipe_budget(ab, seed, shared))
    decays = sft_decays(ab, seed)
    found = {wd: run_sft(ab, seed, shared, steps, wd, f"sft_wd{wd:g}") for wd in decays}
    if seed == ab.seeds[0]:
        best = max(decays, key=lambda wd: (found[wd]["val_accuracy"], -decays.index(wd)))
        ab.grids["sft_weight_decay"] = {
            "searched_on_seed": seed,
            "val_accuracy": {f"{wd:g}": 100 * found[wd]["val_accuracy"] for wd in decays},
            "chosen": best,
        }
    else:
        (best,) = decays
    return {k: v for k, v in found[best].items() if k != "val_accuracy"}


def _chosen(ab: Ablation, grid: str, search: Callable[[], Any]) -> Any:
    if grid not in ab.grids:
        search()
    return ab.grids[grid]["chosen"]


def run_sft(
    ab: Ablation, seed: int, shared: Path, steps: int, weight_decay: float, name: str, overrides: Sequence[str] = ()
) -> dict[str, Any]:
    """`steps` of SFT on the seed chains of thought from the warm-up checkpoint, in
    `seed{seed}/{name}` (`overrides` on top: the side-by-side thread count, which a resume may
    change); a finished run is read, a killed one resumed."""
    from evostar.pipeline import run_experiment

    dst = ab.seed_dir(seed) / name
    if not (dst / "summary.json").exists():
        ab.say(f"seed {seed}: {name} ({steps} SFT steps from the warm-up)")
        cfg = build_config(
            to_dict(_config(shared)),
            [
                f"output_dir={dst}",
                f"model.path={shared / 'checkpoints' / 'warmup'}",
                f"warmup.steps={steps}",
                f"warmup.optim.weight_decay={weight_decay}",
                "evolve.iterations=0",
                "prm.enabled=false",
                f"progress={str(ab.progress).lower()}",
                *overrides,
            ],
        )
        run_experiment(cfg, resume=dst.exists())
    summary = _summary(dst)
    _say_row(ab, name, summary["accuracy"]["final"])
    shared_warmup = _summary(shared)["stage_seconds"]
    return {
        **_accuracies(summary["accuracy"]["final"]),
        "wall_seconds": shared_warmup["base_eval"] + shared_warmup["warmup"] + summary["stage_seconds"]["warmup"],
        "val_accuracy": summary["warmup"]["best_val_accuracy"],
        "steps": steps,
        "weight_decay": weight_decay,
    }


# -------------------------------------------------------------------- GRPO at equal wall-clock
def run_grpo_row(ab: Ablation, seed: int, shared: Path) -> dict[str, Any]:
    """TRL's GRPOTrainer from the warm-up checkpoint on the same prompts and reward. On the first
    seed every learning rate of the grid trains for the full recipe's post-warm-up wall-clock and
    the best by validation accuracy is kept; later seeds train that rate for the steps it reached,
    scaled by their own recipe's wall-clock (a step count, so a resumed row repeats exactly)."""
    from evostar.grpo import run_grpo

    budget = recipe_budget(ab, seed, shared)
    grid = ABLATE_PRESETS[ab.preset]["grpo_lr"]
    first = ab.seeds[0]
    if seed == first:
        found = {}
        for lr in grid:
            dst = ab.seed_dir(seed) / f"grpo_lr{lr:g}"
            if not (dst / "result.json").exists():
                ab.say(f"seed {seed}: grpo lr={lr:g} for {budget:.0f} s")
            found[lr] = run_grpo(shared, dst, lr=lr, seed=seed, max_seconds=budget, progress=ab.progress)
        best = max(grid, key=lambda lr: (found[lr]["val_accuracy"], -grid.index(lr)))
        ab.grids["grpo_lr"] = {
            "searched_on_seed": first,
            "val_accuracy": {f"{lr:g}": 100 * found[lr]["val_accuracy"] for lr in grid},
            "steps": {f"{lr:g}": found[lr]["steps"] for lr in grid},
            "budget_seconds": budget,
            "chosen": best,
        }
        res = found[best]
    else:
        best = _chosen(ab, "grpo_lr", lambda: run_grpo_row(ab, first, ab.seed_dir(first) / "shared"))
        g = ab.grids["grpo_lr"]
        steps = max(1, round(g["steps"][f"{best:g}"] * budget / g["budget_seconds"]))
        dst = ab.seed_dir(seed) / f"grpo_lr{best:g}"
        if not (dst / "result.json").exists():
            ab.say(f"seed {seed}: grpo lr={best:g} for {steps} steps")
        res = run_grpo(shared, dst, lr=best, seed=seed, max_steps=steps, progress=ab.progress)
    secs = _summary(shared)["stage_seconds"]
    ab.say(
        f"  grpo lr={best:g}: test-ID {100 * res['tests']['test_id']:.1f}, test-OOD {100 * res['tests']['test_ood']:.1f}"
    )
    return {
        **_accuracies(res["tests"]),
        "wall_seconds": secs["base_eval"] + secs["warmup"] + res["seconds"],
        "steps": res["steps"],
        "lr": best,
    }


# ------------------------------------------------------------------------------ measures
def seed_measures(ab: Ablation, seed: int, shared: Path) -> dict[str, Any]:
    """Per-seed numbers the findings need beyond test accuracy: the PRM as a verifier and a
    reranker on the warm-up policy's val samples (F3), and the dynamics of the all-correct row (F4)."""
    from evostar.prm_stages import _top2_vs_rest, read_responses
    from evostar.reward.prm.metrics import selection_accuracy

    out: dict[str, Any] = {}
    val = shared / "prm" / "val_responses.jsonl"
    if val.exists():
        responses = read_responses(val)
        k = max(1, len(responses) // max(1, len({r.sample_id for r in responses})))
        curves = selection_accuracy(responses, (k,))
        out["verifier_n"] = k
        out["best_of_n"] = 100 * curves["best_of_n"][k]
        out["majority"] = 100 * curves["majority"][k]
        rerank = _top2_vs_rest(responses, seed)
        for group in ("top2", "rest"):
            g = rerank.get(group) or {}
            out[f"{group}_mean_steps"] = g.get("mean_steps")
            share = g.get("all_steps_correct")
            out[f"{group}_all_steps_correct"] = None if share is None else 100 * share
    loop = ab.seed_dir(seed) / "continuous_25" / "summary.json"
    if loop.exists():
        its = read_json(loop, "run summary")["iterations"]
        if its:
            first, last = its[0], its[-1]
            for key, name in (("val_pass_at_k", "pass"), ("val_accuracy", "greedy")):
                if first.get(key) is not None and last.get(key) is not None:
                    out[f"val_{name}_first"] = 100 * first[key]
                    out[f"val_{name}_last"] = 100 * last[key]
    return out


# --------------------------------------------------------------------------------- the table
def make_table(ab: Ablation, wall_seconds: float) -> dict[str, Any]:
    rows = []
    for name in ab.rows:
        row, per_seed = _BY_NAME[name], ab.results.get(name, {})
        rows.append(table_row(row, {str(s): v for s, v in sorted(per_seed.items())}, ab.grids))
    table = {
        "preset": ab.preset,
        "seeds": ab.seeds,
        "rows": rows,
        "measures": {str(s): m for s, m in sorted(ab.measures.items())},
        "grids": ab.grids,
        "rule": RULE,
        "wall_seconds": wall_seconds,
    }
    table["findings"] = findings(table)
    return table


def table_row(row: Row, per_seed: dict[str, dict[str, Any]], grids: dict[str, Any]) -> dict[str, Any]:
    def stat(key: str, fn: Callable[[np.ndarray], float]) -> float | None:
        vals = np.array([v[key] for v in per_seed.values()], dtype=float)
        if not len(vals):
            return None
        return float(fn(vals)) if len(vals) > 1 or fn is np.mean else None

    notes = [row.what] if row.what else []
    same = {v.get("same_as") for v in per_seed.values()} - {None}
    if same:
        notes.append(f"keeps every correct response at this K: the run of {', '.join(sorted(same))}")
    if row.kind == "sft" and "sft_weight_decay" in grids:
        g = grids["sft_weight_decay"]
        notes.append(
            f"weight decay {g['chosen']:g} chosen on seed {g['searched_on_seed']} from {list(g['val_accuracy'])}"
        )
    if row.kind == "grpo" and "grpo_lr" in grids:
        g = grids["grpo_lr"]
        notes.append(f"lr {g['chosen']:g} chosen on seed {g['searched_on_seed']} from {list(g['val_accuracy'])}")
    return {
        "name": row.name,
        "test_id_mean": stat("test_id", np.mean),
        "test_id_std": stat("test_id", lambda a: np.std(a, ddof=1)),
        "test_ood_mean": stat("test_ood", np.mean),
        "test_ood_std": stat("test_ood", lambda a: np.std(a, ddof=1)),
        "seeds": len(per_seed),
        "wall_seconds_mean": stat("wall_seconds", np.mean),
        "paper_id": row.paper[0],
        "paper_ood": row.paper[1],
        "per_seed": per_seed,
        "note": "; ".join(notes),
    }


@dataclass
class Diff:
    mean: float | None
    se: float | None
    n: int

    def counts(self) -> bool:
        return self.n >= 2 and self.mean is not None and abs(self.mean) > 2 * self.se

    def above(self) -> bool:
        return self.counts() and self.mean > 0

    def below(self) -> bool:
        return self.counts() and self.mean < 0

    def text(self, label: str) -> str:
        if self.mean is None:
            return f"{label}: not measured"
        se = "no SE with 1 seed" if self.n < 2 else f"2·SE {2 * self.se:.1f}"
        return f"{label}: {self.mean:+.1f} ({se}, {self.n} seed{'s' * (self.n != 1)})"


def paired(a: dict[str, float | None], b: dict[str, float | None]) -> Diff:
    """Mean and standard error over seeds of a - b, on the seeds both have."""
    d = [a[s] - b[s] for s in a if s in b and a[s] is not None and b[s] is not None]
    if not d:
        return Diff(None, None, 0)
    se = float(np.std(d, ddof=1) / math.sqrt(len(d))) if len(d) > 1 else None
    return Diff(float(np.mean(d)), se, len(d))


def findings(table: dict[str, Any]) -> list[dict[str, Any]]:
    """The paper's findings F1-F6 and the peer comparisons, judged by RULE from `table`'s
    per-seed rows and measures alone (a test recomputes them from table.json)."""
    rows = {r["name"]: r["per_seed"] for r in table["rows"]}
    measures = table.get("measures", {})

    def acc(name: str, split: str = "test_id") -> dict[str, float | None]:
        return {s: v.get(split) for s, v in rows.get(name, {}).items()}

    def measure(key: str) -> dict[str, float | None]:
        return {s: m.get(key) for s, m in measures.items()}

    def beats(a: str, b: str, split: str = "test_id") -> tuple[bool | None, str]:
        d = paired(acc(a, split), acc(b, split))
        return (None if d.mean is None else d.above()), d.text(f"{a} − {b} ({split})"), d.n

    def not_below(a: str, b: str) -> tuple[bool | None, str]:
        d = paired(acc(a), acc(b))
        return (None if d.mean is None else not d.below()), d.text(f"{a} − {b} (test_id)"), d.n

    def rise(first: str, last: str, up: bool) -> tuple[bool | None, str]:
        d = paired(measure(last), measure(first))
        ok = None if d.mean is None else (d.above() if up else d.below())
        return ok, d.text(f"{last.removesuffix('_last')} last − first iteration (val, continuous_25)"), d.n

    def by_measure(a: str, b: str, label: str) -> tuple[bool | None, str]:
        d = paired(measure(a), measure(b))
        return (None if d.mean is None else d.above()), d.text(label), d.n

    def ood_gain_over_id() -> tuple[bool | None, str]:
        gain = {
            s: None if None in (o, lo, i, li) else (o - lo) - (i - li)
            for s, o, lo, i, li in (
                (
                    s,
                    acc("unlabeled_oracle", "test_ood").get(s),
                    acc("prm_top2", "test_ood").get(s),
                    acc("unlabeled_oracle").get(s),
                    acc("prm_top2").get(s),
                )
                for s in rows.get("unlabeled_oracle", {})
            )
        }
        d = paired(gain, {s: 0.0 for s in gain})
        return (None if d.mean is None else d.above()), d.text("oracle's gain over prm_top2, OOD − ID"), d.n

    def compare(a: str, b: str) -> tuple[bool | None, str]:
        parts = [paired(acc(a, s), acc(b, s)) for s in ("test_id", "test_ood")]
        ok = None if parts[0].mean is None else parts[0].above()
        return (
            ok,
            "; ".join(p.text(f"{a} − {b} ({s})") for p, s in zip(parts, ("test_id", "test_ood"), strict=True)),
            parts[0].n,
        )

    spec: list[tuple[str, str, list[tuple[bool | None, str, int]]]] = [
        (
            "F1a",
            "continuous 25% beats iterative RFT and ReST-EM",
            [beats("continuous_25", "iterative_rft"), beats("continuous_25", "rest_em")],
        ),
        (
            "F1b",
            "25% is the best interval (beats 100%, 50% and 12.5%)",
            [beats("continuous_25", f"continuous_{x}") for x in ("100", "50", "12.5")],
        ),
        ("F2a", "PRM top-2 beats all-correct", [beats("prm_top2", "continuous_25")]),
        ("F2b", "all-correct beats random-2", [beats("continuous_25", "random2")]),
        (
            "F3a",
            "PRM best-of-N is below majority voting (warm-up policy's val samples, N = K)",
            [by_measure("majority", "best_of_n", "majority − PRM best-of-N (val)")],
        ),
        (
            "F3b",
            "the PRM's top-2 correct responses have fewer steps and more all-correct steps than the rest",
            [
                by_measure("rest_mean_steps", "top2_mean_steps", "steps, rest − top-2"),
                by_measure("top2_all_steps_correct", "rest_all_steps_correct", "all-steps-correct share, top-2 − rest"),
            ],
        ),
        (
            "F4",
            "Pass@K falls while greedy accuracy rises over the iterations",
            [rise("val_pass_first", "val_pass_last", up=False), rise("val_greedy_first", "val_greedy_last", up=True)],
        ),
        (
            "F5a",
            "adaptive T by Reward-Pass@2 is at least the best static T (the rows run T=1.0 only)",
            [not_below("mstar", "prm_top2")],
        ),
        ("F5b", "adaptive T by Reward-Pass@2 beats T chosen by Pass@K", [beats("mstar", "adapt_pass_at_k")]),
        (
            "F6a",
            "unlabeled prompts with PRM-weighted pseudo-labels (mixed in at 0% or 75%) do not beat labeled-only",
            [
                (None if r[0] is None else not r[0], r[1], r[2])
                for r in (beats("unlabeled_prm_0", "prm_top2"), beats("unlabeled_prm_75", "prm_top2"))
            ],
        ),
        ("F6b", "unlabeled prompts with oracle answers help OOD more than ID", [ood_gain_over_id()]),
        (
            "P1",
            "M-STaR beats GRPO at equal wall-clock (not a claim of the paper)",
            [compare("mstar", "grpo_equal_wallclock")],
        ),
        (
            "P2",
            "M-STaR beats SFT on the seed set at equal compute (the paper: 45.9 against 44.3)",
            [compare("mstar", "sft_equal_compute")],
        ),
    ]
    out = []
    for fid, claim, parts in spec:
        oks = [ok for ok, _, _ in parts]
        if any(ok is None for ok in oks):
            verdict, reproduced = "not measured (a row it needs was not run)", None
        elif min(n for _, _, n in parts) < 2:  # even a 'does not beat' claim: one seed shows nothing
            verdict, reproduced = "not distinguishable (fewer than 2 seeds)", False
        elif all(oks):
            verdict, reproduced = "reproduced", True
        else:
            verdict, reproduced = "not reproduced", False
        out.append(
            {
                "id": fid,
                "claim": claim,
                "reproduced": reproduced,
                "verdict": verdict,
                "evidence": "; ".join(text for _, text, _ in parts),
            }
        )
    return out


def table_markdown(table: dict[str, Any]) -> str:
    """The table beside the paper's numbers, the findings and the grids, as markdown."""

    def pm(mean: float | None, std: float | None) -> str:
        if mean is None:
            return "–"
        return f"{mean:.1f}" + (f" ± {std:.1f}" if std else "")

    def num(v: float | None) -> str:
        return "–" if v is None else f"{v:.1f}"

    lines = [
        f"# evostar ablate — preset {table['preset']}, seeds {table['seeds']}",
        "",
        "Gym test-ID / test-OOD accuracy (%, mean ± std over seeds) beside the paper's MathV360K-ID / MathVista "
        "(MiniCPM-V-2.5). The gym's numbers are a tiny model on synthetic visual math: compare rows with "
        "each other, not with the paper's absolute values.",
        "",
        "| row | test-ID | test-OOD | paper ID | paper OOD | wall s | seeds | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in table["rows"]:
        lines.append(
            f"| {r['name']} | {pm(r['test_id_mean'], r['test_id_std'])} | {pm(r['test_ood_mean'], r['test_ood_std'])} "
            f"| {num(r['paper_id'])} | {num(r['paper_ood'])} | {num(r['wall_seconds_mean'])} | {r['seeds']} "
            f"| {r['note']} |"
        )
    lines += [
        "",
        "## Findings",
        "",
        f"Rule: {table['rule']}",
        "",
        "| id | claim | verdict | evidence |",
        "|---|---|---|---|",
    ]
    for f in table["findings"]:
        lines.append(f"| {f['id']} | {f['claim']} | **{f['verdict']}** | {f['evidence']} |")
    if table.get("grids"):
        lines += ["", "## Grids (searched on one seed, the chosen value used for every seed)", ""]
        for name, g in table["grids"].items():
            lines.append(f"- {name}: val accuracy {g['val_accuracy']} → chosen {g['chosen']:g}")
    lines += ["", f"Ablation wall-clock: {table['wall_seconds']:.0f} s.", ""]
    return "\n".join(lines)


def write_table(out: Path, table: dict[str, Any]) -> None:
    atomic_write_json(out / "table.json", table)
    atomic_write_text(out / "table.md", table_markdown(table))
    plot_table(table, out / "table.png")


def plot_table(table: dict[str, Any], path: Path) -> Path:
    """Test-ID and test-OOD per row with their std over seeds, the paper's numbers as marks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in table["rows"] if r["test_id_mean"] is not None]
    y = np.arange(len(rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.38 * len(rows) + 1.5), sharey=True)
    for ax, split, paper in zip(axes, ("test_id", "test_ood"), ("paper_id", "paper_ood"), strict=True):
        ax.barh(
            y,
            [r[f"{split}_mean"] for r in rows],
            xerr=[r[f"{split}_std"] or 0 for r in rows],
            color="#4c72b0",
            alpha=0.8,
            label="gym (mean ± std over seeds)",
        )
        py = [(i, r[paper]) for i, r in enumerate(rows) if r[paper] is not None]
        if py:
            ax.scatter([p for _, p in py], [i for i, _ in py], marker="|", s=160, color="#c44e52", label="paper")
        ax.set_title(split.replace("_", "-"))
        ax.set_xlabel("accuracy (%)")
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, [r["name"] for r in rows])
    axes[0].invert_yaxis()
    axes[0].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def load_table(out: Path) -> dict[str, Any]:
    path = Path(out) / "table.json"
    if not path.exists():
        raise RunDirError(f"{out}: no table.json (the ablation has not finished; --resume it first)")
    table = read_json(path, "ablation table")
    if not isinstance(table, dict) or not isinstance(table.get("rows"), list):
        raise RunDirError(f"{path}: not an ablation table (no rows)")
    return table


def write_ablation_report(out: Path, folder: Path | None = None) -> Path:
    """`evostar report DIR` on an ablation: the table's plot and its markdown page in `folder`
    (default DIR/report)."""
    table = load_table(out)
    folder = Path(folder) if folder is not None else Path(out) / "report"
    plot_table(table, folder / "table.png")
    page = folder / "report.md"
    atomic_write_text(page, table_markdown(table) + "\n![table](table.png)\n")
    return page


# --------------------------------------------------------------------------------- recipes
def recipe_configs(preset: str = "default", root: str = "runs/ablate/seed0/shared") -> dict[str, dict[str, Any]]:
    """Each loop and SFT row as a whole `evostar evolve` config on the gym and tiny model that an
    ablation's shared run of seed 0 leaves in `root` (base, warm-up, PRM, loop from scratch)."""
    from evostar.demo import demo_config

    shared = demo_config(ABLATE_PRESETS[preset]["demo"], Path(root), 0, shared_overrides(preset))
    out: dict[str, dict[str, Any]] = {}
    for row in ROWS:
        if row.kind == "loop":
            over = row_overrides(preset, row, Path(root) / "data")
        elif row.kind == "sft":  # the warm-up's steps plus the default ablation's SFT budget, a nominal one
            over = [f"warmup.steps={2 * shared.warmup.steps}", "evolve.iterations=0", "prm.enabled=false"]
        else:
            continue
        cfg = build_config(to_dict(shared), [*over, f"output_dir=runs/gym/{row.name}"])
        data = to_dict(cfg)
        for section in ("warmup", "evolve", "prm"):  # the machine's bf16 choice, not the recipe's
            data[section]["optim"]["autocast"] = ""
        data["prm"]["score_autocast"] = ""
        data["gen"]["rollout_dtype"] = ""
        data["threads"] = 2
        out[row.name] = data
    return out


def write_recipes(folder: Path, preset: str = "default") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in recipe_configs(preset).items():
        row = _BY_NAME[name]
        head = (
            f"# evostar ablate row {name!r} (preset {preset}): {row.what or 'see docs/ablate.md'}\n"
            "# Runs alone from scratch (base eval, warm-up, PRM, loop) on the gym and tiny model of seed 0:\n"
            "#   evostar ablate --preset default --seeds 1 --rows warmup --out runs/ablate   # builds them\n"
            f"#   evostar evolve --config recipes/gym/{name}.yaml\n"
            "# Generated by `python -m evostar.ablate recipes`; tests check it matches the ablation's row.\n"
        )
        path = folder / f"{name}.yaml"
        path.write_text(head + dump_yaml(build_config(data)), encoding="utf-8")
        paths.append(path)
    return paths


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["recipes"]:
        for p in write_recipes(Path(sys.argv[2] if len(sys.argv) > 2 else "recipes/gym")):
            print(p)
    else:
        print(json.dumps(list(ROW_NAMES)))
