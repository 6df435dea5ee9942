"""SFT split across the processes of an `Accelerator` (DDP, FSDP v1/v2, DeepSpeed ZeRO).

Every data choice of the loop (which prompts, which responses are kept, which examples form an
SFT batch) is a deterministic function of the seed, so each rank computes it itself. In SFT only
two things cross processes: the number of target tokens of each step (all-reduced, so the
token-mean loss is taken over the global batch and one step equals a single-process step on the
same batch), and gradients (DDP's all-reduce, FSDP's reduce-scatter). Rollouts are sharded by
`evostar.rollout.sharded`; rank 0 alone writes the run directory (`evostar.rundir.SharedRunDir`).

FSDP (any sharding strategy) and DeepSpeed (any ZeRO stage) train a copy of the module: the loop
samples, evaluates and saves with the module it passed in, which keeps full fp32 weights on every
rank; after each `train()` call the trainer gathers the copy's shards (or DeepSpeed's fp32
master weights) into it.

Tested on CPU with 2 processes (scripts/ddp_smoke.py): accelerate turns an FSDP launch on CPU
into plain DDP, so the script sets the FSDP plugin on the state itself; DeepSpeed runs on its own
CPU accelerator.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from evostar.config import ConfigError, OptimConfig
from evostar.models.inputs import VLMInputs
from evostar.rollout.sharded import shard_bounds
from evostar.train.schedule import ProgressSchedule
from evostar.train.sft import Example, SFTTrainer, new_adamw, response_loss_sum

if TYPE_CHECKING:
    from accelerate import Accelerator


class DistributedSFTTrainer(SFTTrainer):
    """`SFTTrainer` whose optimizer steps are split across the ranks of an `Accelerator`.

    Every rank draws the same global batch (the parent's seeded sampler), takes its contiguous
    slice, and scales its summed token loss by `world / global_targets`: DDP and FSDP average
    gradients over ranks, so the result is the gradient of the token-mean loss of the whole
    batch. `model` stays the unwrapped module (for generation and `save_pretrained`); `wrapped`
    runs the forward/backward. Under DDP they share parameters. Under FSDP and DeepSpeed
    `wrapped` trains a copy (sharded, or cast to bf16 by DeepSpeed), and every `train()` ends by
    gathering its full fp32 weights into `model`, which therefore always holds the master
    weights: checkpoints saved from it resume exactly.
    """

    def __init__(self, model: torch.nn.Module, io: VLMInputs, cfg: OptimConfig, accelerator: Accelerator) -> None:
        from accelerate.utils import DistributedType

        self.accelerator = accelerator
        self.wrapped: torch.nn.Module | None = None
        self._deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        self._fsdp = accelerator.distributed_type == DistributedType.FSDP
        self._copy = self._fsdp or self._deepspeed  # `wrapped` trains a copy of `model`
        if self._deepspeed and cfg.micro_batch_size:
            raise ConfigError(
                "optim.micro_batch_size: DeepSpeed steps its optimizer inside every backward: set micro_batch_size=0 "
                "(one forward/backward per optimizer step)"
            )
        super().__init__(model, io, cfg)

    def reset_optimizer(self) -> None:
        acc = self.accelerator
        if self._deepspeed:
            # model and optimizer form one engine: a fresh optimizer means a fresh engine, on
            # a fresh copy of the model's current weights
            self.wrapped, self.optimizer, self.scheduler = self._deepspeed_engine()
        elif self._fsdp:
            if self.wrapped is None:
                self.wrapped = self._fsdp_copy()
            # A plain torch optimizer over the sharded parameters (accelerate's FSDP2 path will
            # not prepare an optimizer alone, and there is no loss scaler to wrap it for).
            self.optimizer = new_adamw(self.wrapped, self.cfg)
            self.scheduler = ProgressSchedule(self.optimizer, self.cfg)
        else:
            # DDP: wrap the model once; iterative RFT then only swaps the optimizer.
            if self.wrapped is None:
                self.wrapped = self._wrap_once()
            optimizer = new_adamw(self.wrapped, self.cfg)
            self.scheduler = ProgressSchedule(optimizer, self.cfg)
            self.optimizer = acc.prepare(optimizer)
        self.step = 0

    def _wrap_once(self) -> torch.nn.Module:
        """The module's DDP wrapper, created on first use and then reused.

        A second DDP wrapper around the same parameters would leave the first one's gradient
        hooks in place (the accelerator keeps it alive), so warm-up and the loop share one.
        """
        # kept in __dict__, so it is not registered as a submodule (nor saved in the state dict)
        wrapped = self.model.__dict__.get("_evostar_wrapped")
        if wrapped is None:
            wrapped = self.accelerator.prepare(self.model)
            self.model.__dict__["_evostar_wrapped"] = wrapped
        return wrapped

    def _fsdp_copy(self) -> torch.nn.Module:
        """The FSDP-sharded training copy of `model`, holding `model`'s current weights.

        FSDP rewrites the module it wraps (FSDP1 swaps in wrapper submodules, FSDP2 turns
        parameters into DTensor shards), after which it cannot generate on its own. One copy per
        module serves warm-up and the loop; a later trainer loads the module's weights into it
        (warm-up ends by restoring its best weights in the module, not in the copy).
        """
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        acc = self.accelerator
        wrapped = self.model.__dict__.get("_evostar_wrapped")
        if wrapped is not None:
            set_model_state_dict(wrapped, self.model.state_dict(), options=StateDictOptions(full_state_dict=True))
            return wrapped
        acc.free_memory()  # an earlier module's copy (ReST-EM restarts from a fresh module)
        train_copy = self._host_copy()
        if acc.is_fsdp2:  # accelerate shards a v2 model only together with an optimizer
            wrapped, _ = acc.prepare(train_copy, torch.optim.SGD(train_copy.parameters(), lr=0.0))
        else:
            wrapped = acc.prepare(train_copy)
        self.model.__dict__["_evostar_wrapped"] = wrapped
        return wrapped

    def _host_copy(self) -> torch.nn.Module:
        """A copy of `model` made in host memory: a second full copy on the GPU is what the
        sharding is there to avoid."""
        device = next(self.model.parameters()).device
        self.model.to("cpu")
        train_copy = copy.deepcopy(self.model)
        self.model.to(device)
        return train_copy

    def _deepspeed_engine(self) -> tuple[torch.nn.Module, Any, ProgressSchedule]:
        """A DeepSpeed engine training a copy of `model`, its fp32 master weights set to
        `model`'s (DeepSpeed's bf16 mode would otherwise start them from bf16-rounded ones)."""
        from deepspeed.utils import safe_set_full_fp32_param

        acc = self.accelerator
        acc.free_memory()  # the previous engine
        ds_config = acc.state.deepspeed_plugin.deepspeed_config
        # One forward/backward per optimizer step on each rank's share of the global batch.
        # Without a dataloader accelerate cannot fill these in ("auto"); DeepSpeed uses them
        # for its own bookkeeping only, since the trainer draws the batches itself.
        micro = math.ceil(self.cfg.batch_size / acc.num_processes)
        for key, value in (("train_micro_batch_size_per_gpu", micro), ("train_batch_size", micro * acc.num_processes)):
            if ds_config.get(key, "auto") == "auto":
                ds_config[key] = value
        train_copy = self._host_copy()
        optimizer = new_adamw(train_copy, self.cfg)
        schedule = ProgressSchedule(optimizer, self.cfg)  # DeepSpeed steps this optimizer's groups
        engine, wrapped_optimizer = acc.prepare(train_copy, optimizer)
        full = dict(self.model.named_parameters())
        for name, param in engine.module.named_parameters():
            if param.requires_grad:
                safe_set_full_fp32_param(param, full[name].detach().float().to(acc.device))
        return engine, wrapped_optimizer, schedule

    def _deepspeed_adam_states(self) -> list[dict]:
        """The per-partition AdamW states inside DeepSpeed's ZeRO optimizer."""
        inner = self.wrapped.optimizer  # DeepSpeed's ZeRO optimizer around the torch AdamW
        return list(inner.optimizer.state.values())

    def _materialize_adam_states(self) -> None:
        """Create the AdamW states of DeepSpeed's fp32 partitions (torch creates them lazily at
        the first step), so that a resumed engine can take the saved moments before any step."""
        zero = self.wrapped.optimizer
        adam = zero.optimizer
        # the flat fp32 partitions the states are keyed by (ZeRO-3 / ZeRO-1 and 2)
        flats = getattr(zero, "fp32_partitioned_groups_flat", None) or zero.single_partition_of_fp32_groups
        for flat in flats:
            if "exp_avg" not in adam.state[flat]:
                adam.state[flat] = {
                    "step": torch.zeros((), dtype=torch.float32, device=flat.device),
                    "exp_avg": torch.zeros_like(flat),
                    "exp_avg_sq": torch.zeros_like(flat),
                }
        # ZeRO-1/2 map each parameter to its slice of the states after the first step; do it now
        if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
            zero._lazy_init_hp_params_optimizer_state()

    def _full_state_dict(self) -> dict[str, torch.Tensor]:
        """The copy's full fp32 weights on every rank (a collective: all ranks call it)."""
        if self._deepspeed:
            from deepspeed.utils import safe_get_full_fp32_param

            out = {}
            for name, param in self.wrapped.module.named_parameters():
                if param.requires_grad:
                    out[name] = safe_get_full_fp32_param(param).to("cpu")
            return out
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # On GPU gather unit by unit into host memory; offloading CPU shards crashes FSDP1.
        offload = self.accelerator.device.type != "cpu"
        options = StateDictOptions(full_state_dict=True, cpu_offload=offload)
        return get_model_state_dict(self.wrapped, options=options)

    def train(self, examples: Sequence[Example], num_steps: int, seed: int, **kwargs: Any) -> dict[str, float]:
        if not self._copy:
            return super().train(examples, num_steps, seed, **kwargs)
        device = self.accelerator.device
        if device.type != "cpu":
            self.model.to("cpu")  # park the full model: SFT needs only the training copy
        self.wrapped.train()
        stats = super().train(examples, num_steps, seed, **kwargs)
        self.wrapped.eval()
        full = self._full_state_dict()
        if self._fsdp:  # the whole state dict (tied names and buffers included)
            self.model.load_state_dict(full)
        else:  # DeepSpeed: the trained parameters
            with torch.no_grad():
                params = dict(self.model.named_parameters())
                for name, value in full.items():
                    params[name].copy_(value)
        self.model.to(device)
        return stats

    def _step(self, examples: Sequence[Example]) -> tuple[float, int]:
        acc = self.accelerator
        assert self.wrapped is not None
        world, rank = acc.num_processes, acc.process_index
        start, stop = shard_bounds(len(examples), world, rank)
        local = list(examples[start:stop])
        # Same number of forward/backward passes on every rank (DDP syncs buffers in each
        # forward and gradients in the last backward): short ranks add zero-weight passes.
        widest = math.ceil(len(examples) / world)
        micro = self.cfg.micro_batch_size or widest
        n_chunks = max(1, math.ceil(widest / micro))
        chunks: list[tuple[list[Example], float]] = [(local[i : i + micro], 1.0) for i in range(0, len(local), micro)]
        while len(chunks) < n_chunks:
            chunks.append(([examples[0]], 0.0))
        batches = []
        local_targets = 0
        for chunk, weight in chunks:
            batch = self.io.collate_sft([e.sample for e in chunk], [e.response for e in chunk])
            n = int((batch["labels"][:, 1:] != -100).sum())
            local_targets += int(n * weight)
            batches.append((batch, weight))
        counts = acc.reduce(torch.tensor([local_targets], dtype=torch.long, device=acc.device), "sum")
        total_targets = int(counts.item())
        scale = world / max(1, total_targets)
        loss_sum_local = torch.zeros((), dtype=torch.float64, device=acc.device)
        for i, (batch, weight) in enumerate(batches):
            batch = {k: v.to(acc.device) for k, v in batch.items()}
            # Under FSDP no_sync would keep full unsharded gradients until the last micro-batch;
            # reduce-scattering each one keeps only shards.
            sync = i == len(batches) - 1 or self._fsdp
            with contextlib.nullcontext() if sync else acc.no_sync(self.wrapped):
                loss_sum = response_loss_sum(self.wrapped, batch, self.cfg)
                acc.backward(loss_sum * (weight * scale))
            loss_sum_local += loss_sum.detach().double() * weight
        if self.cfg.max_grad_norm:
            acc.clip_grad_norm_(self.wrapped.parameters(), self.cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        loss_total = float(acc.reduce(loss_sum_local, "sum").item())
        return loss_total / max(1, total_targets), total_targets

    def state_dict(self) -> dict:
        """Under FSDP and DeepSpeed: the AdamW moments of the whole model keyed by parameter
        name, the same on every rank, so resume works from this one file (a collective: every
        rank calls it)."""
        if not self._copy:
            return super().state_dict()
        state = {"scheduler": self.scheduler.state_dict(), "step": self.step}
        if self._deepspeed:
            from deepspeed.utils import safe_get_full_optimizer_state

            self._materialize_adam_states()  # no step yet (nothing kept to train on): zeros
            moments = {}
            for name, param in self.wrapped.module.named_parameters():
                if param.requires_grad:
                    moments[name] = {
                        key: safe_get_full_optimizer_state(param, key).to("cpu") for key in ("exp_avg", "exp_avg_sq")
                    }
            steps = {float(s["step"]) for s in self._deepspeed_adam_states() if "step" in s}
            state["optimizer"] = {"deepspeed_adamw": moments, "adam_step": max(steps, default=0.0)}
            return state
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        offload = self.accelerator.device.type != "cpu"
        options = StateDictOptions(full_state_dict=True, cpu_offload=offload)
        state["optimizer"] = get_optimizer_state_dict(self.wrapped, self.optimizer, options=options)
        return state

    def load_state_dict(self, state: dict) -> None:
        if not self._copy:
            return super().load_state_dict(state)
        if self._deepspeed:
            from deepspeed.utils import safe_set_full_optimizer_state

            saved = state["optimizer"]
            self._materialize_adam_states()
            for name, param in self.wrapped.module.named_parameters():
                if param.requires_grad:
                    for key, value in saved["deepspeed_adamw"][name].items():
                        safe_set_full_optimizer_state(param, value.to(self.accelerator.device), key)
            for adam in self._deepspeed_adam_states():
                adam["step"] = torch.full_like(adam["step"], saved["adam_step"])
        else:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            options = StateDictOptions(full_state_dict=True)
            set_optimizer_state_dict(self.wrapped, self.optimizer, state["optimizer"], options=options)
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])


def make_trainer(
    model: torch.nn.Module, io: VLMInputs, cfg: OptimConfig, accelerator: Accelerator | None = None
) -> SFTTrainer:
    """A plain `SFTTrainer` without an accelerator (single process, unchanged), else the DDP one."""
    if accelerator is None:
        return SFTTrainer(model, io, cfg)
    return DistributedSFTTrainer(model, io, cfg, accelerator)
