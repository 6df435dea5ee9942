"""Training the PRM on Monte-Carlo step labels: a loss at the step tags and nowhere else.

At each tag the logits are restricted to the two reward tokens; with target t (1/0 for hard
labels, the share of successful completions for soft ones) the loss is the two-way cross-entropy
``-(t log P(+) + w (1 - t) log P(-))``, `w` the weight of the negative side (1: plain BCE / soft
cross-entropy; 0 asks for balancing: the positive label mass over the negative). It is averaged
over the labelled tags of the whole optimizer batch, so micro-batching does not change it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from evostar.config import OptimConfig
from evostar.errors import UserError
from evostar.models.lora import freeze_vision as freeze_vision_tower
from evostar.records import Sample
from evostar.reward.prm.labels import StepLabels
from evostar.reward.prm.model import PRM, response_segments
from evostar.train import ProgressSchedule, autocast, new_adamw

__all__ = ["PRMExample", "PRMTrainer", "balanced_negative_weight", "examples_from_labels"]


@dataclass
class PRMExample:
    """One training response: its prompt, its text and a target per tag (None: no loss there)."""

    sample: Sample
    text: str
    targets: list[float | None]
    """One per step of `split_steps(text)`, then one for the answer block when it has one."""


def examples_from_labels(
    labels: Sequence[StepLabels], samples_by_id: Mapping[str, Sample], *, label: str = "hard", answer: bool = True
) -> list[PRMExample]:
    """Training examples from labelling output: `hard` or `soft` step targets, and (with
    `answer`) the final answer's correctness at the answer block's tag."""
    if label not in ("hard", "soft"):
        raise UserError(f"label={label!r}: choose hard or soft")
    out = []
    for k, lab in enumerate(labels):
        sample = samples_by_id.get(lab.sample_id)
        if sample is None:
            raise UserError(f"labels record {k}: sample_id {lab.sample_id!r} is not among the samples given")
        steps, block = response_segments(lab.text)
        if len(lab.hard) != len(steps) or len(lab.soft) != len(steps):
            raise UserError(
                f"labels record {k} (sample {lab.sample_id!r}): {len(lab.hard)} hard / {len(lab.soft)} soft "
                f"labels for {len(steps)} steps of its text"
            )
        values = [float(h) for h in lab.hard] if label == "hard" else [float(s) for s in lab.soft]
        targets: list[float | None] = list(values)
        if block is not None:
            targets.append(float(lab.correct) if answer else None)
        if any(t is not None for t in targets):
            out.append(PRMExample(sample, lab.text, targets))
    return out


def balanced_negative_weight(examples: Sequence[PRMExample]) -> float:
    """Positive label mass over negative label mass: both sides weigh the same in the loss."""
    targets = [t for e in examples for t in e.targets if t is not None]
    pos, neg = sum(targets), sum(1.0 - t for t in targets)
    return float(pos / neg) if pos > 0 and neg > 0 else 1.0


class PRMTrainer:
    """AdamW over the PRM's trainable weights with the repo's progress schedule."""

    def __init__(
        self, prm: PRM, cfg: OptimConfig, *, negative_weight: float = 1.0, freeze_vision: bool = False
    ) -> None:
        if negative_weight < 0:
            raise UserError(f"negative_weight={negative_weight}: must be >= 0 (0: balance)")
        self.prm = prm
        self.cfg = cfg
        self.negative_weight = negative_weight
        if freeze_vision:
            freeze_vision_tower(prm.model)
        torch.set_flush_denormal(True)  # as SFT: denormal Adam moments slow CPU steps
        self.optimizer = new_adamw(prm.model, cfg)
        self.scheduler = ProgressSchedule(self.optimizer, cfg)
        self.step = 0

    def loss_sums(self, examples: Sequence[PRMExample], weight: float) -> tuple[torch.Tensor, int]:
        """Summed tag losses of `examples` (with the graph) and how many tags carry a target."""
        batch, positions, _ = self.prm.encode([e.sample for e in examples], [e.text for e in examples])
        for e, row in zip(examples, positions, strict=True):
            if len(row) != len(e.targets):
                raise UserError(f"sample {e.sample.id!r}: {len(e.targets)} targets for {len(row)} tags of its text")
        pairs = self.prm.tag_logits(batch, positions)
        logp = torch.cat([p.log_softmax(-1) for p in pairs])
        flat = [t for e in examples for t in e.targets]
        mask = torch.tensor([t is not None for t in flat], device=logp.device)
        target = torch.tensor([0.0 if t is None else t for t in flat], device=logp.device)
        per_tag = -(target * logp[:, 1] + weight * (1.0 - target) * logp[:, 0])
        return per_tag[mask].sum(), int(mask.sum())

    @torch.no_grad()
    def evaluate_loss(self, examples: Sequence[PRMExample]) -> float:
        """Mean tag loss of `examples` at the current weights, with the negative weight of 1."""
        self.prm.model.eval()
        total, count = 0.0, 0
        for i in range(0, len(examples), self.cfg.batch_size):
            s, n = self.loss_sums(examples[i : i + self.cfg.batch_size], 1.0)
            total, count = total + s.item(), count + n
        return total / max(1, count)

    def train(self, examples: Sequence[PRMExample], num_steps: int, seed: int = 0, progress: bool = False) -> dict:
        """`num_steps` optimizer steps over shuffled epochs of `examples`."""
        if not examples or num_steps <= 0:
            return {"steps": 0, "loss": None, "negative_weight": None}
        weight = self.negative_weight or balanced_negative_weight(examples)
        rng = np.random.default_rng(seed)
        bs = self.cfg.batch_size
        micro = self.cfg.micro_batch_size or bs
        order: list[int] = []
        losses: list[float] = []
        self.prm.model.train()
        for i in tqdm(range(num_steps), desc="prm", unit="step", disable=not progress, leave=False):
            self.scheduler.set_progress(i / num_steps)
            if len(order) < bs:
                order.extend(rng.permutation(len(examples)).tolist())
            chosen, order = [examples[j] for j in order[:bs]], order[bs:]
            chunks = [chosen[j : j + micro] for j in range(0, len(chosen), micro)]
            total = sum(sum(t is not None for t in e.targets) for e in chosen)
            loss_sum = 0.0
            for chunk in chunks:
                with autocast(self.cfg, self.prm.device):  # off by default: a no-op context
                    s, _ = self.loss_sums(chunk, weight)
                (s / max(1, total)).backward()
                loss_sum += s.item()
            if self.cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(self.prm.model.parameters(), self.cfg.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            losses.append(loss_sum / max(1, total))
        self.prm.model.eval()
        return {
            "steps": num_steps,
            "loss": float(np.mean(losses[-max(1, num_steps // 4) :])),
            "negative_weight": weight,
        }
