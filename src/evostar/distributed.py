"""Multi-process self-evolving training through accelerate (DDP; FSDP/DeepSpeed configs too).

Every data choice of the loop (which prompts, which responses are kept, which examples form an
SFT batch) is a deterministic function of the seed, so each rank computes it itself. Only three
things cross processes:

* generated responses: each rank samples its shard of the prompts, `gather_object` hands every
  rank the full list, so all ranks select the same training set;
* the number of target tokens of each SFT step: all-reduced, so the token-mean loss is taken over
  the global batch and one step equals a single-process step on the same batch;
* gradients (DDP's all-reduce).

Rank 0 alone writes the run directory (`SharedRunDir`); all ranks read it on resume.

Launch on CPU (gloo; `accelerate launch --cpu --num_processes 2` silently runs one process)::

    torchrun --nproc_per_node 2 script.py
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 script.py

Tested: DDP on CPU (accelerate turns an FSDP launch on CPU into plain multi-CPU DDP, so FSDP
cannot be tried here). The loop generates, evaluates and saves with the unwrapped module, which
holds the full weights only under DDP, ZeRO-2 and FSDP NO_SHARD: `make_accelerator` refuses
FSDP sharding and ZeRO-3 at start (`sharded_weights_problem`) instead of failing mid-run.
"""

from __future__ import annotations

import contextlib
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
    adds bf16 autocast to the SFT forward under any launcher.
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

    The loop samples, evaluates and saves with the unwrapped module. FSDP (every strategy but
    NO_SHARD) and DeepSpeed ZeRO-3 keep only this rank's shard of each parameter there outside
    forward/backward, so sampling would fail or read garbage hours into a run: refuse at start.
    """
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    hint = "launch with configs/accelerate/ddp.yaml or deepspeed_zero2.yaml (full weights per rank)"
    if kind == DistributedType.FSDP:
        plugin = accelerator.state.fsdp_plugin
        strategy = getattr(plugin, "sharding_strategy", None)
        if plugin.fsdp_version == 1 and getattr(strategy, "name", strategy) == "NO_SHARD":
            return None
        return (
            f"FSDP (version {plugin.fsdp_version}, {getattr(strategy, 'name', None) or 'sharded'}) is not "
            "supported by the loop yet: sampling, evaluation and saving need the full parameters "
            f"(FSDP.summon_full_params), which evostar does not gather; {hint}"
        )
    if kind == DistributedType.DEEPSPEED and int(accelerator.state.deepspeed_plugin.zero_stage) >= 3:
        return (
            "DeepSpeed ZeRO-3 is not supported by the loop yet: sampling, evaluation and saving "
            f"need the full parameters (deepspeed.zero.GatheredParameters); {hint}"
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
    slice, and scales its summed token loss by `world / global_targets`: DDP averages gradients
    over ranks, so the result is the gradient of the token-mean loss of the whole batch. `model`
    stays the unwrapped module (for generation and `save_pretrained`); `wrapped` runs the
    forward/backward.
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
        else:
            # DDP/FSDP: wrap the model once (FSDP wants it wrapped before the optimizer exists);
            # iterative RFT then only swaps the optimizer.
            if self.wrapped is None:
                self.wrapped = self._wrap_once()
            optimizer = new_adamw(self.wrapped, self.cfg)
            self.scheduler = ProgressSchedule(optimizer, self.cfg)
            self.optimizer = acc.prepare(optimizer)
        self.step = 0

    def _wrap_once(self) -> torch.nn.Module:
        """The module's DDP/FSDP wrapper, created on first use and then reused.

        A second DDP wrapper around the same parameters would leave the first one's gradient
        hooks in place (the accelerator keeps it alive), so warm-up and the loop share one.
        """
        # kept in __dict__, so it is not registered as a submodule (nor saved in the state dict)
        wrapped = self.model.__dict__.get("_evostar_wrapped")
        if wrapped is None:
            wrapped = self.accelerator.prepare(self.model)
            self.model.__dict__["_evostar_wrapped"] = wrapped
        return wrapped

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
            sync = i == len(batches) - 1
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

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full weights on every rank (gathers FSDP / ZeRO-3 shards), e.g. for a vLLM update."""
        return self.accelerator.get_state_dict(self.wrapped, unwrap=True)


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
