"""Training: SFT with a persistent optimizer and LR schedule, its multi-process variant, and the
warm-up on gold chains of thought.

`SFTTrainer` owns one AdamW and one schedule. Continuous self-evolving keeps a single trainer for
the whole run (weights, AdamW moments and the schedule's position carry over between iterations);
iterative RFT calls `reset_optimizer()` at each iteration. `make_trainer` picks the trainer for
the launch (one process, or DDP / FSDP / DeepSpeed through accelerate).
"""

from evostar.train.distributed import DistributedSFTTrainer, make_trainer
from evostar.train.schedule import ProgressSchedule
from evostar.train.sft import Example, SFTTrainer, autocast, autocast_dtype, new_adamw
from evostar.train.warmup import WarmupCheckpoint, warmup

__all__ = [
    "DistributedSFTTrainer",
    "Example",
    "ProgressSchedule",
    "SFTTrainer",
    "WarmupCheckpoint",
    "autocast",
    "autocast_dtype",
    "make_trainer",
    "new_adamw",
    "warmup",
]
