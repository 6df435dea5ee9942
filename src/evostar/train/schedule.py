"""The LR schedule as a function of training progress, so one schedule spans a whole run."""

from __future__ import annotations

import math

import torch

from evostar.config import OptimConfig


class ProgressSchedule:
    """LR as a function of training progress in [0, 1] (linear warm-up, then constant / linear /
    cosine decay to `min_lr_ratio`, or wsd: constant, then the linear decay over the last
    `decay_ratio` only).

    Progress, not the optimizer step, drives it: an iteration's SFT takes as many steps as its
    selected data needs, and continuous self-evolving maps iteration i of n to progress
    [(i-1)/n, i/n], so one schedule spans the whole run whatever each iteration trained.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> None:
        self.optimizer = optimizer
        self.cfg = cfg
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.progress = 0.0
        self.set_progress(0.0)

    def factor(self, progress: float) -> float:
        cfg = self.cfg
        if progress < cfg.warmup_ratio:
            return (progress + 1e-3) / (cfg.warmup_ratio + 1e-3)
        if cfg.schedule == "constant":
            return 1.0
        p = min(1.0, (progress - cfg.warmup_ratio) / max(1e-9, 1.0 - cfg.warmup_ratio))
        if cfg.schedule == "wsd":  # hold the peak, then decay linearly over the last decay_ratio
            p = max(0.0, (p - (1.0 - cfg.decay_ratio)) / cfg.decay_ratio)
        shape = 0.5 * (1.0 + math.cos(math.pi * p)) if cfg.schedule == "cosine" else 1.0 - p
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape

    def set_progress(self, progress: float) -> None:
        self.progress = float(progress)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * self.factor(self.progress)

    def state_dict(self) -> dict:
        return {"progress": self.progress, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: dict) -> None:
        self.base_lrs = list(state["base_lrs"])
        self.set_progress(state["progress"])
