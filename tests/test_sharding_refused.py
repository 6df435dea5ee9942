"""FSDP sharding and ZeRO-3 are refused at start, not hours into a run.

accelerate turns an FSDP launch on CPU into plain multi-CPU DDP, so no real FSDP `Accelerator`
can be built on this machine: the check is given a stand-in carrying accelerate's real
`FullyShardedDataParallelPlugin` objects, which is all it reads.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from accelerate import FullyShardedDataParallelPlugin
from accelerate.utils import DistributedType

from evostar.distributed import sharded_weights_problem


def _fsdp(**plugin_kwargs) -> SimpleNamespace:
    plugin = FullyShardedDataParallelPlugin(**plugin_kwargs)
    return SimpleNamespace(distributed_type=DistributedType.FSDP, state=SimpleNamespace(fsdp_plugin=plugin))


@pytest.mark.filterwarnings("ignore:sharding_strategy is deprecated")
@pytest.mark.parametrize(
    "kwargs",
    [
        {"fsdp_version": 1, "sharding_strategy": "FULL_SHARD"},
        {"fsdp_version": 1, "sharding_strategy": "SHARD_GRAD_OP"},
        {"fsdp_version": 2, "reshard_after_forward": True},
        {"fsdp_version": 2, "reshard_after_forward": False},
    ],
)
def test_sharded_fsdp_is_refused_with_the_way_out(kwargs):
    problem = sharded_weights_problem(_fsdp(**kwargs))
    assert problem and "FSDP" in problem and "ddp.yaml" in problem


@pytest.mark.filterwarnings("ignore:sharding_strategy is deprecated")
def test_unsharded_launches_pass():
    assert sharded_weights_problem(_fsdp(fsdp_version=1, sharding_strategy="NO_SHARD")) is None
    for kind in (DistributedType.MULTI_CPU, DistributedType.MULTI_GPU, DistributedType.NO):
        assert sharded_weights_problem(SimpleNamespace(distributed_type=kind)) is None


def test_zero3_is_refused_and_zero2_passes():
    def deepspeed(stage: int) -> SimpleNamespace:
        plugin = SimpleNamespace(zero_stage=stage)  # DeepSpeedPlugin needs deepspeed installed
        return SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, state=SimpleNamespace(deepspeed_plugin=plugin))

    assert "ZeRO-3" in sharded_weights_problem(deepspeed(3))
    assert sharded_weights_problem(deepspeed(2)) is None
