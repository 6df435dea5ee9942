"""Rollouts split across processes: each rank samples a contiguous shard of the prompts and
every rank gets all responses back in prompt order (`accelerate.utils.gather_object`), so all
ranks select the same training set without further communication."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from evostar.models.inputs import VLMInputs
from evostar.records import Response, Sample
from evostar.rundir import stage_seed

if TYPE_CHECKING:
    from accelerate import Accelerator


def shard_bounds(n: int, world: int, rank: int) -> tuple[int, int]:
    """Contiguous [start, stop) of `n` items for `rank`; the first `n % world` ranks get one more.

    Contiguous shards keep order: concatenating the ranks' outputs in rank order restores it.
    """
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


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
