"""Multi-process self-evolving training through accelerate (DDP, FSDP; DeepSpeed ZeRO-2).

Every data choice of the loop (which prompts, which responses are kept, which examples form an
SFT batch) is a deterministic function of the seed, so each rank computes it itself. Only three
things cross processes:

* generated responses: each rank samples its shard of the prompts, `gather_object` hands every
  rank the full list, so all ranks select the same training set;
* the number of target tokens of each SFT step: all-reduced, so the token-mean loss is taken over
  the global batch and one step equals a single-process step on the same batch;
* gradients (DDP's all-reduce, FSDP's reduce-scatter), and under FSDP the weight shards
  gathered into full weights after each SFT stage.

Rank 0 alone writes the run directory (`SharedRunDir`); all ranks read it on resume.

Launch on CPU (gloo; `accelerate launch --cpu --num_processes 2` silently runs one process)::

    torchrun --nproc_per_node 2 script.py
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 script.py

FSDP (v1 or v2, any sharding strategy) trains a copy of the module: the loop samples, evaluates
and saves with the module it passed in, which keeps full weights on every rank; after each
`train()` call the trainer gathers the copy's shards into it (`DistributedSFTTrainer`).
DeepSpeed ZeRO-3 is refused at start (`sharded_weights_problem`); ZeRO-2 keeps full weights.

Tested on CPU: DDP, and FSDP v1 and v2 with full sharding (accelerate turns an FSDP launch on
CPU into plain DDP, so `scripts/ddp_smoke.py` sets the FSDP plugin on the state itself).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from evostar.config import Config, OptimConfig
from evostar.models.inputs import VLMInputs
from evostar.records import Response, Sample
from evostar.rundir import RunDir, stage_seed
from evostar.train import Example, ProgressSchedule, SFTTrainer, autocast, new_adamw

if TYPE_CHECKING:
    from accelerate import Accelerator


def launched_distributed() -> bool:
    """True under `torchrun` / `accelerate launch` with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def make_accelerator(cfg: Config | None = None) -> Accelerator:
    """The run's `Accelerator`: CPU (gloo) unless CUDA is there and the config allows it.

    `find_unused_parameters=True` because some VLMs leave parameters out of the loss (LLaVA's
    CLIP post-layernorm); DDP would otherwise fail on the first step. FSDP and DeepSpeed (and
    their mixed precision) come from the launcher's config file, not from here; `optim.autocast`
    adds bf16 autocast to the SFT forward under any launcher. ZeRO-3 is refused here.
    """
    from accelerate import Accelerator, DistributedDataParallelKwargs

    device = cfg.device if cfg is not None else "auto"
    cpu = device == "cpu" or not torch.cuda.is_available()
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    accelerator = Accelerator(cpu=cpu, kwargs_handlers=[ddp])
    problem = sharded_weights_problem(accelerator)
    if problem:
        from evostar.config import ConfigError

        raise ConfigError(problem)
    return accelerator


def sharded_weights_problem(accelerator: Accelerator) -> str | None:
    """Why the launcher's sharding would leave the loop without full weights, or None.

    The loop samples, evaluates and saves with the unwrapped module. FSDP is handled (the
    trainer gathers its shards into that module after each `train()`); DeepSpeed ZeRO-3 keeps
    only this rank's partition there outside forward/backward and has no such gather here, so
    sampling would fail or read garbage hours into a run: refuse it at start.
    """
    from accelerate.utils import DistributedType

    if (
        accelerator.distributed_type == DistributedType.DEEPSPEED
        and int(accelerator.state.deepspeed_plugin.zero_stage) >= 3
    ):
        return (
            "DeepSpeed ZeRO-3 is not supported by the loop yet: sampling, evaluation and saving "
            "need the full parameters (deepspeed.zero.GatheredParameters); launch with "
            "configs/accelerate/fsdp.yaml (sharded) or deepspeed_zero2.yaml (full weights per rank)"
        )
    return None


def shard_bounds(n: int, world: int, rank: int) -> tuple[int, int]:
    """Contiguous [start, stop) of `n` items for `rank`; the first `n % world` ranks get one more.

    Contiguous shards keep order: concatenating the ranks' outputs in rank order restores it.
    """
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class DistributedSFTTrainer(SFTTrainer):
    """`SFTTrainer` whose optimizer steps are split across the ranks of an `Accelerator`.

    Every rank draws the same global batch (the parent's seeded sampler), takes its contiguous
    slice, and scales its summed token loss by `world / global_targets`: DDP and FSDP average
    gradients over ranks, so the result is the gradient of the token-mean loss of the whole
    batch. `model` stays the unwrapped module (for generation and `save_pretrained`); `wrapped`
    runs the forward/backward. Under DDP and ZeRO-2 they share parameters. Under FSDP `wrapped`
    is a sharded copy, and every `train()` ends by gathering its full weights into `model`.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        io: VLMInputs,
        cfg: OptimConfig,
        accelerator: Accelerator,
    ) -> None:
        from accelerate.utils import DistributedType

        self.accelerator = accelerator
        self.wrapped: torch.nn.Module | None = None
        self._deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        self._fsdp = accelerator.distributed_type == DistributedType.FSDP
        if self._deepspeed and cfg.micro_batch_size:
            raise ValueError(
                "DeepSpeed steps its optimizer inside every backward: set micro_batch_size=0 "
                "(one forward/backward per optimizer step)"
            )
        super().__init__(model, io, cfg)

    def reset_optimizer(self) -> None:
        acc = self.accelerator
        if self._deepspeed:
            # model and optimizer form one engine: a fresh optimizer means a fresh engine
            acc.free_memory()
            optimizer = new_adamw(self.model, self.cfg)
            self.scheduler = ProgressSchedule(optimizer, self.cfg)
            self.wrapped, self.optimizer = acc.prepare(self.model, optimizer)
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
            set_model_state_dict(
                wrapped, self.model.state_dict(), options=StateDictOptions(full_state_dict=True)
            )
            return wrapped
        acc.free_memory()  # an earlier module's copy (ReST-EM restarts from a fresh module)
        # Copy in host memory: a second full copy on the GPU is what FSDP is there to avoid.
        device = next(self.model.parameters()).device
        self.model.to("cpu")
        train_copy = copy.deepcopy(self.model)
        self.model.to(device)
        if acc.is_fsdp2:  # accelerate shards a v2 model only together with an optimizer
            wrapped, _ = acc.prepare(train_copy, torch.optim.SGD(train_copy.parameters(), lr=0.0))
        else:
            wrapped = acc.prepare(train_copy)
        self.model.__dict__["_evostar_wrapped"] = wrapped
        return wrapped

    def _full_state_dict(self) -> dict[str, torch.Tensor]:
        """The sharded copy's full weights on every rank (a collective: all ranks call it)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # On GPU gather unit by unit into host memory; offloading CPU shards crashes FSDP1.
        offload = self.accelerator.device.type != "cpu"
        options = StateDictOptions(full_state_dict=True, cpu_offload=offload)
        return get_model_state_dict(self.wrapped, options=options)

    def train(
        self, examples: Sequence[Example], num_steps: int, seed: int, **kwargs: Any
    ) -> dict[str, float]:
        if not self._fsdp:
            return super().train(examples, num_steps, seed, **kwargs)
        device = self.accelerator.device
        if device.type != "cpu":
            self.model.to("cpu")  # park the full copy: SFT needs only the shards on the GPU
        self.wrapped.train()
        stats = super().train(examples, num_steps, seed, **kwargs)
        self.wrapped.eval()
        self.model.load_state_dict(self._full_state_dict())
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
        chunks: list[tuple[list[Example], float]] = [
            (local[i : i + micro], 1.0) for i in range(0, len(local), micro)
        ]
        while len(chunks) < n_chunks:
            chunks.append(([examples[0]], 0.0))
        batches = []
        local_targets = 0
        for chunk, weight in chunks:
            batch = self.io.collate_sft([e.sample for e in chunk], [e.response for e in chunk])
            n = int((batch["labels"][:, 1:] != -100).sum())
            local_targets += int(n * weight)
            batches.append((batch, weight))
        counts = acc.reduce(
            torch.tensor([local_targets], dtype=torch.long, device=acc.device), "sum"
        )
        total_targets = int(counts.item())
        scale = world / max(1, total_targets)
        loss_sum_local = torch.zeros((), dtype=torch.float64, device=acc.device)
        for i, (batch, weight) in enumerate(batches):
            batch = {k: v.to(acc.device) for k, v in batch.items()}
            labels = batch.pop("labels")
            # Under FSDP no_sync would keep full unsharded gradients until the last micro-batch;
            # reduce-scattering each one keeps only shards.
            sync = i == len(batches) - 1 or self._fsdp
            with contextlib.nullcontext() if sync else acc.no_sync(self.wrapped):
                with autocast(self.cfg, acc.device):  # forward only; backward outside it
                    logits = self.wrapped(**batch).logits
                logits = logits[:, :-1].float()
                targets = labels[:, 1:]
                loss_sum = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]),
                    targets.reshape(-1),
                    ignore_index=-100,
                    reduction="sum",
                )
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
        if not self._fsdp:
            return super().state_dict()
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        # AdamW moments of the whole model keyed by parameter name, the same on every rank:
        # resume works from this one file (a collective: every rank calls it).
        offload = self.accelerator.device.type != "cpu"
        options = StateDictOptions(full_state_dict=True, cpu_offload=offload)
        state = super().state_dict()
        state["optimizer"] = get_optimizer_state_dict(self.wrapped, self.optimizer, options=options)
        return state

    def load_state_dict(self, state: dict) -> None:
        if not self._fsdp:
            return super().load_state_dict(state)
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(self.wrapped, self.optimizer, state["optimizer"], options=options)
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])


def maybe_accelerator(cfg: Config | None = None) -> Accelerator | None:
    """`make_accelerator(cfg)` when launched with several processes, else None (one process)."""
    return make_accelerator(cfg) if launched_distributed() else None


def make_trainer(
    model: torch.nn.Module,
    io: VLMInputs,
    cfg: OptimConfig,
    accelerator: Accelerator | None = None,
) -> SFTTrainer:
    """A plain `SFTTrainer` without an accelerator (single process, unchanged), else the DDP one."""
    if accelerator is None:
        return SFTTrainer(model, io, cfg)
    return DistributedSFTTrainer(model, io, cfg, accelerator)


def generate_sharded(
    accelerator: Accelerator,
    model: torch.nn.Module,
    io: VLMInputs,
    samples: Sequence[Sample],
    *,
    generate_fn: Any = None,
    **kwargs: Any,
) -> list[Response]:
    """Each rank generates its contiguous shard; every rank gets all responses in sample order.

    The caller seeds torch once for the step; rank r > 0 samples from a seed derived from it
    (shards must not share one random stream), inside a forked RNG so that every rank leaves
    with the same RNG state it came in with.
    """
    from accelerate.utils import gather_object

    if generate_fn is None:
        from evostar.rollout.hf import generate as generate_fn
    rank, world = accelerator.process_index, accelerator.num_processes
    start, stop = shard_bounds(len(samples), world, rank)
    kwargs["progress"] = bool(kwargs.get("progress", True)) and accelerator.is_main_process
    cuda = [torch.cuda.current_device()] if accelerator.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        if rank > 0:
            torch.manual_seed(stage_seed(torch.initial_seed(), "rank", rank))
        local = generate_fn(model, io, list(samples[start:stop]), **kwargs)
    return list(gather_object(local))


class SharedRunDir(RunDir):
    """A `RunDir` every rank can use: all ranks read it and track progress in memory, rank 0
    alone writes, and ranks wait for each other around checkpoints so none reads a half-written
    one or runs ahead into the next stage while rank 0 is still saving.
    """

    def __init__(
        self, root: str | os.PathLike, accelerator: Accelerator, resume: bool = False
    ) -> None:
        self.accelerator = accelerator
        self.is_main = accelerator.is_main_process
        if not self.is_main:
            # rank 0 may already be writing into root: read its state only after it has checked it
            accelerator.wait_for_everyone()
        super().__init__(root, resume=resume)
        if self.is_main:
            accelerator.wait_for_everyone()

    def finish(self, stage: str, result: Any = None) -> None:
        if self.is_main:
            super().finish(stage, result)
        else:
            if stage not in self.progress["completed"]:
                self.progress["completed"].append(stage)
            self.progress["results"][stage] = result
        self.accelerator.wait_for_everyone()

    def log(self, stage: str, **values: Any) -> None:
        if self.is_main:
            super().log(stage, **values)

    def _truncate_metrics(self) -> None:
        if self.is_main:
            super()._truncate_metrics()

    def save_checkpoint(
        self,
        stage: str,
        model: torch.nn.Module,
        processor: Any,
        trainer_state: dict | None = None,
        state: dict | None = None,
    ) -> Path:
        self.accelerator.wait_for_everyone()
        if self.is_main:
            super().save_checkpoint(stage, model, processor, trainer_state, state)
        self.accelerator.wait_for_everyone()
        return self.checkpoint_dir(stage)

    def prune_checkpoints(self, keep: Any) -> None:
        if self.is_main:
            super().prune_checkpoints(keep)
        self.accelerator.wait_for_everyone()


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every tensor of the state dict (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def assert_in_sync(accelerator: Accelerator, model: torch.nn.Module) -> str:
    """Raise unless every rank holds bitwise-identical weights; returns the digest."""
    from accelerate.utils import gather_object

    digest = weights_digest(model)
    digests = gather_object([digest])
    if len(set(digests)) != 1:
        raise RuntimeError(f"ranks hold different weights: {digests}")
    return digest
