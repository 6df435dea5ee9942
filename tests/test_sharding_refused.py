"""DeepSpeed ZeRO-3 is refused at start, not hours into a run; other launchers pass the check.

deepspeed is not installed here, so ZeRO is given as a stand-in carrying only the `zero_stage`
the check reads. FSDP passes (it is trained for real in tests/test_ddp.py).
"""

from __future__ import annotations

from types import SimpleNamespace

from accelerate.utils import DistributedType

from evostar.distributed import sharded_weights_problem


def deepspeed(stage: int) -> SimpleNamespace:
    plugin = SimpleNamespace(zero_stage=stage)  # DeepSpeedPlugin needs deepspeed installed
    return SimpleNamespace(
        distributed_type=DistributedType.DEEPSPEED, state=SimpleNamespace(deepspeed_plugin=plugin)
    )


def test_zero3_is_refused_with_the_way_out() -> None:
    problem = sharded_weights_problem(deepspeed(3))
    assert problem and "ZeRO-3" in problem and "fsdp.yaml" in problem


def test_other_launchers_pass() -> None:
    assert sharded_weights_problem(deepspeed(2)) is None
    for kind in (
        DistributedType.FSDP,
        DistributedType.MULTI_CPU,
        DistributedType.MULTI_GPU,
        DistributedType.NO,
    ):
        assert sharded_weights_problem(SimpleNamespace(distributed_type=kind)) is None
