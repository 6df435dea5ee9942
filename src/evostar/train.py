"""SFT on selected responses. The persistent optimizer and LR schedule live here.

`SFTTrainer` owns one AdamW and one schedule. Continuous self-evolving keeps a single trainer for
the whole run (weights, AdamW moments and the schedule's step carry over between iterations);
iterative RFT calls `reset_optimizer()` at each iteration.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from evostar.config import OptimConfig
from evostar.models.inputs import VLMInputs
from evostar.records import Sample


@dataclass
class Example:
    """One SFT target: the prompt sample and the response text to imitate."""

    sample: Sample
    response: str


def autocast_dtype(name: str) -> torch.dtype | None:
    """`OptimConfig.autocast` as a dtype; None when off.

    fp16 is refused: its narrow exponent range needs loss scaling (a GradScaler, and a sharded
    one under FSDP), which the trainers do not implement. bf16 has fp32's range and needs none.
    """
    if not name:
        return None
    if name == "bf16":
        return torch.bfloat16
    if name == "fp16":
        raise ValueError(
            "optim.autocast=fp16 is not supported: fp16 gradients need loss scaling (GradScaler), "
            "which evostar does not implement; use bf16 (CPU, NVIDIA Ampere or newer) or '' (off)"
        )
    raise ValueError(f"optim.autocast={name!r}: choose '' (off) or bf16")


def autocast(cfg: OptimConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """`torch.autocast` for the SFT forward pass when `cfg.autocast` is set, else a no-op."""
    dtype = autocast_dtype(cfg.autocast)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def new_adamw(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, fused where PyTorch has the kernel: one call per
    step instead of a dozen per tensor (on the tiny CPU model ~2 ms instead of ~10 ms)."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(
        params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999), fused=fused or None
    )


class ProgressSchedule:
    """LR as a function of training progress in [0, 1] (linear warm-up, then constant / linear /
    cosine decay to `min_lr_ratio`, or wsd: constant, then the linear decay over the last
    `decay_ratio` only).

    Progress, not the optimizer step, drives it: an iteration's SFT takes as many steps as its
    selected data needs, and continuous self-evolving maps iteration i of n to progress
    [(i-1)/n, i/n], so one schedule spans the whole run whatever each iteration trained.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> None:
        if cfg.schedule not in ("constant", "linear", "cosine", "wsd"):
            raise ValueError(f"unknown schedule {cfg.schedule!r} (constant, linear, cosine, wsd)")
        if cfg.schedule == "wsd" and not 0.0 < cfg.decay_ratio <= 1.0:
            raise ValueError(f"decay_ratio must be in (0, 1], got {cfg.decay_ratio}")
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


class SFTTrainer:
    """Negative log-likelihood on response tokens (prompt and image tokens masked)."""

    def __init__(self, model: torch.nn.Module, io: VLMInputs, cfg: OptimConfig) -> None:
        self.model = model
        self.io = io
        self.cfg = cfg
        autocast_dtype(cfg.autocast)  # refuse a bad value before any training
        # Denormal floats in Adam moments slow CPU steps ~10x after a few dozen steps.
        torch.set_flush_denormal(True)
        self.reset_optimizer()

    def reset_optimizer(self) -> None:
        self.optimizer = new_adamw(self.model, self.cfg)
        self.scheduler = ProgressSchedule(self.optimizer, self.cfg)
        self.step = 0

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def train(
        self,
        examples: Sequence[Example],
        num_steps: int,
        seed: int,
        desc: str = "sft",
        progress: bool = True,
        on_step: Callable[[int, float], None] | None = None,
        span: tuple[float, float] = (0.0, 1.0),
    ) -> dict[str, float]:
        """`num_steps` optimizer steps over shuffled epochs of `examples`, the LR schedule
        moving through `span` of the run's progress."""
        if not examples or num_steps <= 0:
            return {"steps": 0, "loss": float("nan"), "tokens": 0}
        rng = np.random.default_rng(seed)
        bs = self.cfg.batch_size
        self.model.train()
        losses: list[float] = []
        tokens = 0
        order: list[int] = []
        bar = tqdm(range(num_steps), desc=desc, unit="step", disable=not progress, leave=False)
        for i in bar:
            self.scheduler.set_progress(span[0] + (span[1] - span[0]) * i / num_steps)
            if len(order) < bs:
                order.extend(rng.permutation(len(examples)).tolist())
            idx, order = order[:bs], order[bs:]
            batch_examples = [examples[i] for i in idx]
            loss, n_tokens = self._step(batch_examples)
            losses.append(loss)
            tokens += n_tokens
            bar.set_postfix(loss=f"{loss:.3f}")
            if on_step is not None:
                on_step(self.step, loss)
        self.model.eval()
        return {"steps": num_steps, "loss": float(np.mean(losses[-max(1, num_steps // 4) :])), "tokens": tokens}

    def _step(self, examples: Sequence[Example]) -> tuple[float, int]:
        micro = self.cfg.micro_batch_size or len(examples)
        chunks = [examples[i : i + micro] for i in range(0, len(examples), micro)]
        device = next(self.model.parameters()).device
        total_targets = 0
        batches = []
        for chunk in chunks:
            batch = self.io.collate_sft([e.sample for e in chunk], [e.response for e in chunk])
            n = int((batch["labels"][:, 1:] != -100).sum())
            total_targets += n
            batches.append((batch, n))
        total_loss = 0.0
        for batch, _ in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch.pop("labels")
            with autocast(self.cfg, device):  # off by default: a no-op context
                logits = self.model(**batch).logits
            logits = logits[:, :-1].float()
            targets = labels[:, 1:]
            loss_sum = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
            )
            # Token-mean over the whole batch, so micro-batching does not change the gradient.
            (loss_sum / max(1, total_targets)).backward()
            total_loss += loss_sum.item()
        if self.cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return total_loss / max(1, total_targets), total_targets

    def state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
        }

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])


def warmup(
    model: torch.nn.Module,
    io: VLMInputs,
    seed_samples: Sequence[Sample],
    val_samples: Sequence[Sample],
    cfg,
    gen_cfg,
    *,
    seed: int,
    progress: bool = True,
    log: Callable[..., None] | None = None,
    accelerator=None,
) -> dict:
    """SFT on the gold chains of thought; keep the weights with the best validation accuracy.

    Validation accuracy keeps rising long after the training loss is near zero on the small
    seed set, so there is no patience-based stop: the model trains for `cfg.steps` and the best
    evaluated state is restored (the curve is logged, so one can see it had plateaued).
    """
    from evostar.distributed import make_trainer  # [distributed] accelerator=None: SFTTrainer
    from evostar.evaluate import evaluate

    examples = [Example(s, s.target) for s in seed_samples]
    trainer = make_trainer(model, io, cfg.optim, accelerator)  # [distributed]
    best = {"accuracy": -1.0, "step": 0}
    best_state: dict[str, torch.Tensor] | None = None
    curve = []
    done = 0
    rng = np.random.default_rng(seed)
    while done < cfg.steps:
        chunk = min(cfg.eval_every, cfg.steps - done)
        stats = trainer.train(
            examples, chunk, seed=int(rng.integers(2**31)), desc="warm-up", progress=progress,
            span=(done / cfg.steps, (done + chunk) / cfg.steps),
        )  # fmt: skip
        done += chunk
        metrics, _ = evaluate(model, io, val_samples, gen_cfg, desc="warm-up val", progress=progress)
        point = {"step": done, "loss": stats["loss"], "val_accuracy": metrics["accuracy"], "lr": trainer.lr}
        curve.append(point)
        if log:
            log(**point)
        if metrics["accuracy"] > best["accuracy"]:
            best = {"accuracy": metrics["accuracy"], "step": done}
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return {"best_step": best["step"], "best_val_accuracy": best["accuracy"], "curve": curve}
