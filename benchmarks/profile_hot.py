"""Where one SFT step and one rollout batch spend their time, against this CPU's matmul limit.

For each case the script times the work, profiles it with `torch.profiler` (top operators by
self CPU time, grouped into matrix multiplies, attention, element-wise and copies, and the rest),
counts its matrix-multiply FLOPs, and then times every matrix-multiply shape the work used in
isolation, in the dtype it ran in. The sum over shapes of (calls x isolated time) is the
*limit*: the time this work would take if nothing but its matrix multiplies ran, each at the
speed this machine reaches for that shape. `achieved / limit` = limit time / measured time.

Cases: SFT in float32 and under `optim.autocast=bf16` (batch 32 of gym chains of thought), and
sampling one batch (64 prompts x K=8, 48 new tokens) with bfloat16 weights as the rollout pool
does, in this one process with the given threads.

    python benchmarks/profile_hot.py                 # under a minute on 2 cores
    python benchmarks/profile_hot.py --threads 1 --out profile.json
"""

from __future__ import annotations

import argparse
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _common import (
    default_workdir,
    load_split,
    log,
    machine_info,
    prepare_gym,
    prepare_tiny_model,
    setup_torch,
    write_json,
)
from torch.profiler import ProfilerActivity, profile

MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}
ATTENTION = ("attention", "softmax")
MOVES = {"aten::copy_", "aten::cat", "aten::_to_copy", "aten::fill_", "aten::zero_", "aten::index", "aten::clone"}
ELEMENTWISE = {
    "aten::mul",
    "aten::add",
    "aten::add_",
    "aten::silu",
    "aten::silu_backward",
    "aten::pow",
    "aten::neg",
    "aten::div",
    "aten::sum",
    "aten::mean",
    "aten::rsqrt",
    "aten::sub",
}


def category(name: str) -> str:
    if name in MATMULS:
        return "matmul"
    if any(word in name for word in ATTENTION):
        return "attention kernels"
    if name in MOVES:
        return "copies / casts / fills"
    if name in ELEMENTWISE:
        return "element-wise"
    return "other"


def matmul_shape(name: str, shapes: list) -> tuple[int, int, int, int] | None:
    """(batch, m, k, n) of a matrix multiply event's input shapes."""
    try:
        if name == "aten::mm":
            (m, k), (_, n) = shapes[0], shapes[1]
            return 1, m, k, n
        if name == "aten::addmm":
            (m, k), (_, n) = shapes[1], shapes[2]
            return 1, m, k, n
        if name in ("aten::bmm", "aten::baddbmm"):
            a, b = (shapes[0], shapes[1]) if name == "aten::bmm" else (shapes[1], shapes[2])
            return a[0], a[1], a[2], b[2]
    except (IndexError, ValueError, TypeError):
        return None
    return None


def isolated_seconds(shape: tuple[int, int, int, int], dtype: torch.dtype, min_time: float = 0.01) -> float:
    """Median time of one matrix multiply of this shape and dtype, repeated until `min_time`."""
    b, m, k, n = shape
    x = torch.randn(b, m, k).to(dtype)
    w = torch.randn(b, k, n).to(dtype)
    fn = (lambda: torch.mm(x[0], w[0])) if b == 1 else (lambda: torch.bmm(x, w))
    fn()
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_time or reps < 3:
        fn()
        reps += 1
    return (time.perf_counter() - t0) / reps


def analyse(name: str, work: Callable[[], Any], repeats: int, dtype: torch.dtype) -> dict[str, Any]:
    work()  # warm caches and allocator
    t0 = time.perf_counter()
    for _ in range(repeats):
        work()
    seconds = (time.perf_counter() - t0) / repeats
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        work()
    by_category: dict[str, float] = defaultdict(float)
    by_op: Counter[str] = Counter()
    shapes: Counter[tuple[int, int, int, int]] = Counter()
    for event in prof.events():
        if event.device_type.name != "CPU":
            continue
        self_s = event.self_cpu_time_total / 1e6
        by_op[event.name] += self_s
        by_category[category(event.name)] += self_s
        if event.name in MATMULS and (shape := matmul_shape(event.name, event.input_shapes)):
            shapes[shape] += 1
    profiled = sum(by_category.values()) or 1.0
    flops = sum(2 * b * m * k * n * count for (b, m, k, n), count in shapes.items())
    limit = sum(count * isolated_seconds(shape, dtype) for shape, count in shapes.items())
    return {
        "case": name,
        "seconds": seconds,
        "matmul_gflop": flops / 1e9,
        "achieved_gflop_per_s": flops / seconds / 1e9,
        "limit_seconds": limit,
        "limit_gflop_per_s": flops / limit / 1e9 if limit else float("nan"),
        "achieved_over_limit": limit / seconds,
        "share": {cat: t / profiled for cat, t in sorted(by_category.items(), key=lambda kv: -kv[1])},
        "top_ops": [(op, t / profiled) for op, t in by_op.most_common(8)],
        "matmul_shapes": len(shapes),
        "dtype": str(dtype).replace("torch.", ""),
    }


def sft_case(model_dir: Path, samples: list, autocast: str) -> Callable[[], Any]:
    from evostar.config import OptimConfig
    from evostar.models.hub import load_model_and_processor
    from evostar.models.inputs import VLMInputs
    from evostar.train import Example, SFTTrainer

    model, processor = load_model_and_processor(model_dir)
    cfg = OptimConfig(lr=1e-3, schedule="constant", batch_size=32, weight_decay=0.0, autocast=autocast)
    trainer = SFTTrainer(model, VLMInputs(processor), cfg)
    examples = [Example(s, s.target) for s in samples]
    return lambda: trainer.train(examples, 1, seed=0, progress=False)


def rollout_case(model_dir: Path, samples: list) -> Callable[[], Any]:
    from evostar.models.hub import load_model_and_processor
    from evostar.models.inputs import VLMInputs
    from evostar.rollout.hf import generate

    model, processor = load_model_and_processor(model_dir, dtype=torch.bfloat16)
    io = VLMInputs(processor)

    def work() -> Any:
        torch.manual_seed(0)
        return generate(model, io, samples, k=8, temperature=1.0, max_new_tokens=48, batch_size=512, progress=False)

    return work


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="timed repeats per case (mean reported)")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    setup_torch(args.threads)
    workdir = args.workdir or default_workdir()
    gym = prepare_gym(workdir, n_seed=200, n_train=256, seed=0)
    model_dir = prepare_tiny_model(workdir, gym, seed=0)
    from bench_rollout import warm_model  # a model that ends its turns, as after warm-up

    warm_dir, _ = warm_model(model_dir, gym, steps=60, n_seed=200, seed=0)
    seeds = load_split(gym, "seed", 200)
    prompts = load_split(gym, "train", 64)
    cases = [
        ("sft step, float32, batch 32", sft_case(warm_dir, seeds, ""), torch.float32),
        ("sft step, bf16 autocast, batch 32", sft_case(warm_dir, seeds, "bf16"), torch.bfloat16),
        ("rollout batch, bf16 weights, 64 prompts x 8, 48 tokens", rollout_case(warm_dir, prompts), torch.bfloat16),
    ]
    results = []
    for name, work, dtype in cases:
        r = analyse(name, work, args.repeats, dtype)
        results.append(r)
        log(f"\n{name}: {r['seconds'] * 1e3:.1f} ms")
        log(
            f"  matmul work {r['matmul_gflop']:.2f} GFLOP in {r['dtype']}: achieved {r['achieved_gflop_per_s']:.1f} "
            f"GFLOP/s; limit {r['limit_seconds'] * 1e3:.1f} ms at {r['limit_gflop_per_s']:.1f} GFLOP/s "
            f"(these shapes alone, {r['matmul_shapes']} shapes) -> achieved/limit {r['achieved_over_limit']:.2f}"
        )
        log("  profiled self time: " + ", ".join(f"{c} {s:.0%}" for c, s in r["share"].items()))
        log("  top ops: " + ", ".join(f"{op} {s:.0%}" for op, s in r["top_ops"]))
    result = {"benchmark": "profile", "machine": machine_info(), "threads": args.threads, "cases": results}
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
