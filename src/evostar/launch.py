"""Where a run executes: one process, or several under `torchrun` / `accelerate launch`.

Launch on CPU (gloo; `accelerate launch --cpu --num_processes 2` silently runs one process)::

    torchrun --nproc_per_node 2 -m evostar.cli evolve --config run.yaml device=cpu
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 ...

FSDP and DeepSpeed (and their mixed precision) come from the launcher's config file
(`configs/accelerate/`), not from here. What crosses processes, and how the trainers split work,
is described in `evostar.train.distributed` and `evostar.rollout.sharded`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import sys
from typing import TYPE_CHECKING, Any

import torch

from evostar.config import Config, refuse

if TYPE_CHECKING:
    from accelerate import Accelerator


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of returning it to the system.

    A training step or decode step allocates and frees the same large activation tensors again
    and again; by default glibc maps each one fresh from the kernel and unmaps it on free, so
    every step pays page faults on memory it just released. Raising the mmap and trim thresholds
    keeps those blocks in the heap for reuse; the process then does not hand freed memory back
    to the system. Process-wide; a no-op where the C library is not glibc. True if applied.
    """
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    settings = ((m_mmap_threshold, 32 << 20), (m_trim_threshold, 1 << 30), (m_top_pad, 64 << 20))  # 32 MiB: glibc's cap
    return all([mallopt(option, value) == 1 for option, value in settings])


def cpu_has_bf16() -> bool:
    """This CPU has native bf16 dot products (AVX512-BF16 or AMX), where bf16 matrix multiplies
    run about twice as fast as float32 ones; elsewhere bf16 autocast on the CPU is slower."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def launched_distributed() -> bool:
    """True under `torchrun` / `accelerate launch` with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def resolve_device(name: str) -> torch.device:
    """`Config.device` as a torch device (`auto`: CUDA when there is one)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def make_accelerator(cfg: Config | None = None) -> Accelerator:
    """The run's `Accelerator`: CPU (gloo) unless CUDA is there and the config allows it.

    `find_unused_parameters=True` because some VLMs leave parameters out of the loss (LLaVA's
    CLIP post-layernorm); DDP would otherwise fail on the first step. `optim.autocast` adds bf16
    autocast to the SFT forward under any launcher.
    """
    from accelerate import Accelerator, DistributedDataParallelKwargs, InitProcessGroupKwargs

    device = cfg.device if cfg is not None else "auto"
    handlers: list[Any] = [DistributedDataParallelKwargs(find_unused_parameters=True)]
    cpu = device == "cpu" or not torch.cuda.is_available()
    if cpu and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        # accelerate drops DeepSpeed when told cpu=True; DeepSpeed's own CPU accelerator runs
        # over gloo, which accelerate only picks for CPU when asked
        cpu = False
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    return Accelerator(cpu=cpu, kwargs_handlers=handlers)


def maybe_accelerator(cfg: Config | None = None) -> Accelerator | None:
    """`make_accelerator(cfg)` when launched with several processes, else None (one process)."""
    return make_accelerator(cfg) if launched_distributed() else None


def check_environment(cfg: Config) -> None:
    """Refuse what this machine cannot run (called at the start of a run, before any compute)."""
    from evostar.tracking import check_trackers

    check_trackers(cfg.eval.trackers)
    if cfg.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise refuse("device", cfg.device, "no CUDA device on this machine: use cpu or auto")
        index = int(cfg.device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise refuse("device", cfg.device, f"this machine has {torch.cuda.device_count()} CUDA device(s)")
    on_cpu = cfg.device == "cpu" or not torch.cuda.is_available()
    if (cfg.gen.workers > 1 or cfg.gen.rollout_dtype) and (launched_distributed() or not on_cpu):
        raise refuse(
            "gen.workers",
            cfg.gen.workers,
            "gen.workers / gen.rollout_dtype are for one process on "
            "CPU; under torchrun / accelerate every rank already samples its shard, and a GPU run "
            "uses gen.backend=vllm",
        )
    cores = os.cpu_count() or 1
    if cfg.threads > cores:
        raise refuse("threads", cfg.threads, f"more threads than this machine's {cores} CPU cores (0: all of them)")
    if cfg.gen.workers > cores:
        raise refuse("gen.workers", cfg.gen.workers, f"more processes than this machine's {cores} CPU cores")
    if cfg.gen.backend == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise refuse("gen.backend", "vllm", "vllm is not installed: pip install 'evostar[vllm]' (CUDA only)")
        if on_cpu:
            raise refuse("gen.backend", "vllm", "vLLM needs a CUDA GPU: use gen.backend=hf on CPU")
    if cfg.model.lora_r > 0 and importlib.util.find_spec("peft") is None:
        raise refuse("model.lora_r", cfg.model.lora_r, "LoRA needs peft: pip install 'evostar[peft]'")
    if cfg.model.quantize_4bit:
        from evostar.models.lora import QLoRAUnavailableError, check_4bit_possible

        try:
            check_4bit_possible()
        except QLoRAUnavailableError as err:
            raise refuse("model.quantize_4bit", True, str(err)) from None
