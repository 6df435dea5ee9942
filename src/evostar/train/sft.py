"""SFT on selected responses: the trainer that owns the persistent optimizer and LR schedule
(negative log-likelihood of the response tokens; prompt and image tokens are masked)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from evostar.config import OptimConfig
from evostar.models.hub import forward_accepts
from evostar.models.inputs import IGNORE_INDEX, VLMInputs
from evostar.records import Sample
from evostar.train.schedule import ProgressSchedule


@dataclass
class Example:
    """One SFT target: the prompt sample and the response text to imitate."""

    sample: Sample
    response: str


def autocast_dtype(name: str) -> torch.dtype | None:
    """`OptimConfig.autocast` as a dtype; None when off (the config refuses fp16 and others)."""
    return {"": None, "bf16": torch.bfloat16}[name]


def autocast_context(name: str, device: torch.device) -> contextlib.AbstractContextManager:
    """`torch.autocast` in the precision `name` ('' or bf16) on `device`; a no-op for ''."""
    dtype = autocast_dtype(name)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def autocast(cfg: OptimConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """`torch.autocast` for the SFT forward pass when `cfg.autocast` is set, else a no-op."""
    return autocast_context(cfg.autocast, device)


def response_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor], cfg: OptimConfig) -> torch.Tensor:
    """Summed next-token NLL of the labelled (response) tokens of a collated SFT batch.

    Only the positions from the first labelled token on are projected to the vocabulary
    (`logits_to_keep`, a view of the hidden states): prompt and image positions carry no loss.
    The KV cache is off, since a training forward never reads it. The padding mask is dropped:
    `collate_sft` pads on the right, so under causal attention no labelled token can see a pad,
    and attention without a mask is cheaper; only the (unlabelled) pad positions change.
    """
    batch = dict(batch)
    labels = batch.pop("labels")
    batch.pop("attention_mask", None)
    kwargs: dict = {"use_cache": False}
    first = 1
    if forward_accepts(model, "logits_to_keep"):
        labelled = (labels != IGNORE_INDEX).any(0).nonzero()
        first = max(1, int(labelled[0])) if len(labelled) else labels.shape[1]
        kwargs["logits_to_keep"] = labels.shape[1] - first + 1  # the last positions, from first - 1
    with autocast(cfg, labels.device):  # forward only; backward outside it
        logits = model(**batch, **kwargs).logits[:, :-1]
    targets = labels[:, first:]
    return torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def new_adamw(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, fused where PyTorch has the kernel: one call per
    step instead of a dozen per tensor."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999), fused=fused or None)


class SFTTrainer:
    """Negative log-likelihood on response tokens (prompt and image tokens masked)."""

    def __init__(self, model: torch.nn.Module, io: VLMInputs, cfg: OptimConfig) -> None:
        self.model = model
        self.io = io
        self.cfg = cfg
        # Denormal floats in Adam moments slow CPU steps many times after a few dozen steps.
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
            return {"steps": 0, "loss": None, "tokens": 0}
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
            loss_sum = response_loss_sum(self.model, {k: v.to(device) for k, v in batch.items()}, self.cfg)
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
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
