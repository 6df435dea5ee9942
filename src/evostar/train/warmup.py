"""Warm-up: SFT on the gold chains of thought that keeps the weights with the best validation
accuracy, checkpointed at every evaluation so a killed warm-up loses at most one interval."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from evostar.config import GenerationConfig, WarmupConfig
from evostar.models.inputs import VLMInputs
from evostar.records import Sample
from evostar.rundir import RunDir, atomic_write_json, read_json
from evostar.train.distributed import make_trainer
from evostar.train.sft import Example

if TYPE_CHECKING:
    from accelerate import Accelerator


class WarmupCheckpoint:
    """The unfinished warm-up in `RUN/checkpoints/warmup_progress/`: the current weights, the
    best weights so far, the trainer state (AdamW, schedule) and the validation curve.

    The best weights wait here on disk rather than in memory: on a large model a second copy on
    the accelerator is what the memory budget does not have.
    """

    NAME = "warmup_progress"

    def __init__(self, run: RunDir) -> None:
        self.run = run
        self.dir = run.checkpoint_dir(self.NAME)

    def _existing(self) -> Path | None:
        for d in (self.dir, self.dir.with_name(self.NAME + ".old")):  # .old: killed mid-swap
            if (d / "state.json").exists():
                return d
        return None

    def load_into(self, model: torch.nn.Module) -> dict[str, Any] | None:
        """Put the saved current weights into `model`; the saved state, or None to start fresh."""
        found = self._existing()
        if found is None:
            return None
        state = read_json(found / "state.json", "warm-up checkpoint state")
        load_model(model, found / "weights.safetensors", device=str(next(model.parameters()).device))
        state["trainer"] = torch.load(found / "trainer.pt", weights_only=True)
        self.dir = found
        return state

    def save(self, model: torch.nn.Module, trainer_state: dict, state: dict, improved: bool) -> None:
        self.run.barrier()
        if self.run.is_main:
            final = self.run.checkpoint_dir(self.NAME)
            tmp, old = final.with_name(self.NAME + ".tmp"), final.with_name(self.NAME + ".old")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_model(model, str(tmp / "weights.safetensors"))
            # the files are never modified once written, so a link shares them between versions
            _link(tmp / "weights.safetensors" if improved else self.dir / "best.safetensors", tmp / "best.safetensors")
            torch.save(trainer_state, tmp / "trainer.pt")
            atomic_write_json(tmp / "state.json", state)
            shutil.rmtree(old, ignore_errors=True)
            if final.exists():
                os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
            self.dir = final
        self.run.barrier()
        self.dir = self.run.checkpoint_dir(self.NAME)

    def restore_best(self, model: torch.nn.Module) -> None:
        load_model(model, self.dir / "best.safetensors", device=str(next(model.parameters()).device))

    def remove(self) -> None:
        if self.run.is_main:
            for suffix in ("", ".tmp", ".old"):
                shutil.rmtree(self.dir.with_name(self.NAME + suffix), ignore_errors=True)
        self.run.barrier()


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # a file system without hard links
        shutil.copyfile(src, dst)


def warmup(
    model: torch.nn.Module,
    io: VLMInputs,
    seed_samples: Sequence[Sample],
    val_samples: Sequence[Sample],
    cfg: WarmupConfig,
    gen_cfg: GenerationConfig,
    *,
    seed: int,
    progress: bool = True,
    log: Callable[..., None] | None = None,
    accelerator: Accelerator | None = None,
    run: RunDir | None = None,
) -> dict:
    """SFT on the gold chains of thought; keep the weights with the best validation accuracy.

    Validation accuracy keeps rising long after the training loss is near zero on the small
    seed set, so there is no patience-based stop: the model trains for `cfg.steps` and the best
    evaluated state is restored (the curve is logged, so one can see it had plateaued). With a
    run directory, every evaluation also checkpoints the warm-up and a later call resumes from
    the last one, ending exactly as an uninterrupted warm-up would.
    """
    import time

    from evostar.evaluate import evaluate

    t0 = time.perf_counter()
    checkpoint = WarmupCheckpoint(run) if run is not None else None
    resumed = checkpoint.load_into(model) if checkpoint is not None else None  # before the trainer copies it
    examples = [Example(s, s.target) for s in seed_samples]
    trainer = make_trainer(model, io, cfg.optim, accelerator)  # [distributed] SFTTrainer on one process
    best: dict[str, Any] = {"accuracy": -1.0, "step": 0}
    curve: list[dict] = []
    best_in_memory: dict[str, torch.Tensor] | None = None
    seconds_before = 0.0  # spent by the runs this one resumes
    if resumed is not None:
        trainer.load_state_dict(resumed["trainer"])
        seconds_before = resumed.get("seconds", 0.0)
        best, curve = resumed["best"], resumed["curve"]
        for point in curve:  # the resumed run's metrics read like an uninterrupted one's
            if log:
                log(**point)
    rng = np.random.default_rng(seed)
    for _ in curve:  # the seeds of the intervals already trained
        rng.integers(2**31)
    done = curve[-1]["step"] if curve else 0
    while done < cfg.steps:
        chunk = min(cfg.eval_every, cfg.steps - done)
        stats = trainer.train(
            examples,
            chunk,
            seed=int(rng.integers(2**31)),
            desc="warm-up",
            progress=progress,
            span=(done / cfg.steps, (done + chunk) / cfg.steps),
        )
        done += chunk
        metrics, _ = evaluate(model, io, val_samples, gen_cfg, desc="warm-up val", progress=progress)
        point = {"step": done, "loss": stats["loss"], "val_accuracy": metrics["accuracy"], "lr": trainer.lr}
        curve.append(point)
        if log:
            log(**point)
        improved = metrics["accuracy"] > best["accuracy"]
        if improved:
            best = {"accuracy": metrics["accuracy"], "step": done}
        if checkpoint is not None:
            state = {"best": best, "curve": curve, "seconds": seconds_before + time.perf_counter() - t0}
            checkpoint.save(model, trainer.state_dict(), state, improved)
        elif improved:  # host memory: the accelerator has no room for a second copy
            best_in_memory = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    if checkpoint is not None and curve:
        checkpoint.restore_best(model)
    elif best_in_memory is not None:
        model.load_state_dict(best_in_memory)
    model.eval()
    seconds = seconds_before + time.perf_counter() - t0
    return {"best_step": best["step"], "best_val_accuracy": best["accuracy"], "curve": curve, "seconds": seconds}
