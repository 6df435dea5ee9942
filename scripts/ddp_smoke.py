"""Two-process smoke run of the distributed self-evolving loop (CPU, gloo), for tests/test_ddp.py.

    torchrun --nproc_per_node 2 scripts/ddp_smoke.py WORK [MODE]

MODE `ddp` (the default) is plain DDP. `fsdp.yaml` / `fsdp2.yaml` run FSDP (v1 / v2, full
sharding) with the `fsdp_config` of that file in configs/accelerate/ and mixed precision off, so
that the step can be compared with a single-process one to 1e-5; `fsdp.yaml+mixed` adds the
file's mixed precision (bf16), i.e. the file exactly as shipped. accelerate builds FSDP only for
GPU-like devices and turns an FSDP launch on CPU into DDP, so `fsdp_accelerator` sets the plugin
on the accelerator's state itself; everything from there on (wrapping, sharded steps, gathering)
is accelerate's and torch's real FSDP. `deepspeed_zero2.yaml` / `deepspeed_zero3.yaml` (and
`+mixed`) run DeepSpeed on its CPU accelerator over gloo, configured from the file's
deepspeed_config as `accelerate launch` would; no state is patched there.

In one launch, on a tiny Qwen2-VL and a tiny gym:

1. step: one DDP SFT step on a 5-example global batch (micro-batches of 2, so one rank also runs a
   zero-weight padding pass); rank 0 repeats it with the plain single-process `SFTTrainer` on a
   fresh copy of the model and records the largest weight difference.
2. memorize: a few DDP steps on the training answers, so that the loop's samples include correct
   responses and its SFT has something to train on (a random-init model answers nothing right).
3. run A: two loop iterations, uninterrupted.
4. run B: the same two iterations, killed (an exception) right after iteration 1 is marked
   finished, then resumed from the run directory with a freshly loaded model.
5. reuse: a second trainer on a module whose weights were reset after the first one trained
   must train from the reset weights (warm-up -> loop under FSDP).
6. iterative RFT and ReST-EM, two iterations each.
7. LoRA: three steps on a LoRA model against the same steps in one process.

Each rank writes WORK/result_rank{R}.json: weight digests after each phase (the test compares
ranks) and, on rank 0, the step difference and both runs' metrics and checkpoint digests.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import torch
import yaml

from evostar.config import Config, EvalConfig, EvolveConfig, GenerationConfig, ModelConfig, OptimConfig
from evostar.context import RunContext
from evostar.data.loaders import load_samples
from evostar.evolve import evolve
from evostar.launch import make_accelerator
from evostar.models.hub import full_weights, load_model, load_processor, save_model_and_processor
from evostar.models.inputs import VLMInputs
from evostar.models.lora import prepare_for_training
from evostar.rollout import make_rollout
from evostar.rundir import SharedRunDir
from evostar.train import DistributedSFTTrainer, Example, SFTTrainer

ROOT = Path(__file__).resolve().parents[1]


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every tensor of the state dict (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def assert_in_sync(accelerator, model: torch.nn.Module) -> str:
    """Raise unless every rank holds bitwise-identical weights; returns the digest."""
    from accelerate.utils import gather_object

    digest = weights_digest(model)
    digests = gather_object([digest])
    if len(set(digests)) != 1:
        raise RuntimeError(f"ranks hold different weights: {digests}")
    return digest


def loop(acc, cfg: Config, run: SharedRunDir, model: torch.nn.Module, io: VLMInputs, train, val):
    """`evolve.evolve` on `run`, restarting ReST-EM from `cfg.model.path`."""
    ctx = RunContext(cfg, run, io, acc.device, acc, make_rollout(cfg), lambda *a, **k: None)
    return evolve(ctx, model, train, val, Path(cfg.model.path))


def launch_file(mode: str, kind: str, env_name) -> tuple[dict, bool]:
    """The configs/accelerate file of MODE `<file>[+mixed]` and whether `+mixed` was asked;
    its `<kind>_config` goes into the environment as `accelerate launch` passes it on
    (`env_name(key)` names the variable)."""
    import os

    config_name, _, mixed = mode.partition("+")
    launch = yaml.safe_load((ROOT / "configs" / "accelerate" / config_name).read_text())
    assert launch["distributed_type"] == kind.upper(), config_name
    for key, value in launch[f"{kind}_config"].items():
        os.environ[env_name(key)] = str(value).lower() if isinstance(value, bool) else str(value)
    return launch, bool(mixed)


def fsdp_accelerator(mode: str):
    """An FSDP `Accelerator` on CPU, configured from configs/accelerate/<file> for MODE `<file>`
    (mixed precision off) or `<file>+mixed` (the file's mixed precision too)."""
    import os

    from accelerate import FullyShardedDataParallelPlugin, PartialState
    from accelerate.utils import DistributedType

    # fsdp_x: v -> FSDP_X=v, read by the plugin
    launch, mixed = launch_file(mode, "fsdp", lambda key: "FSDP_" + key.removeprefix("fsdp_").upper())
    if mixed:  # as `accelerate launch` passes it on
        os.environ["ACCELERATE_MIXED_PRECISION"] = launch["mixed_precision"]
    acc = make_accelerator(Config(device="cpu"))
    os.environ["ACCELERATE_USE_FSDP"] = "true"  # set before, it makes accelerate demand a GPU
    # as AcceleratorState does for an FSDP launch, on both shared states (a later
    # `AcceleratorState()` copies PartialState's values over its own)
    acc.state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    acc.state.fsdp_plugin = FullyShardedDataParallelPlugin()
    if mixed:  # what accelerate's state does for an FSDP launch with mixed precision
        acc.state.fsdp_plugin.set_mixed_precision(launch["mixed_precision"])
    # FSDP1 compares the device with its CPU compute device, "cpu" (accelerate says "cpu:0")
    acc.state.device = PartialState._shared_state["device"] = torch.device("cpu")
    return acc


# `accelerate launch` passes a DeepSpeed file's deepspeed_config on as these variables
_DEEPSPEED_ENV = {
    "zero_stage": "ACCELERATE_DEEPSPEED_ZERO_STAGE",
    "gradient_accumulation_steps": "ACCELERATE_GRADIENT_ACCUMULATION_STEPS",
    "gradient_clipping": "ACCELERATE_GRADIENT_CLIPPING",
    "offload_optimizer_device": "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE",
    "offload_param_device": "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE",
    "zero3_init_flag": "ACCELERATE_DEEPSPEED_ZERO3_INIT",
    "zero3_save_16bit_model": "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL",
}


def deepspeed_accelerator(mode: str):
    """A DeepSpeed `Accelerator` on CPU (DeepSpeed's CPU accelerator, gloo), configured from
    configs/accelerate/<file> as `accelerate launch` would; `+mixed` adds its mixed precision."""
    import os

    launch, mixed = launch_file(mode, "deepspeed", _DEEPSPEED_ENV.__getitem__)
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    os.environ["ACCELERATE_MIXED_PRECISION"] = launch["mixed_precision"] if mixed else "no"
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return make_accelerator(Config(device="cpu"))


def local_numel(param: torch.Tensor) -> int:
    """Elements of `param` this rank holds: an FSDP2 DTensor's shard, a ZeRO-3 partition."""
    if hasattr(param, "ds_tensor"):
        return param.ds_tensor.numel()
    if hasattr(param, "to_local"):
        return param.to_local().numel()
    return param.numel()


class Killed(RuntimeError):
    """Stands for a kill right after a stage is marked finished."""


class KilledAfter(SharedRunDir):
    def __init__(self, root: Path, accelerator, stage: str) -> None:
        super().__init__(root, accelerator)
        self.kill_stage = stage

    def finish(self, stage: str, result=None) -> None:
        super().finish(stage, result)
        if stage == self.kill_stage:
            raise Killed(stage)


def loop_config(work: Path, out: Path, micro: int = 2) -> Config:
    return Config(
        output_dir=str(out),
        seed=0,
        threads=1,
        device="cpu",
        progress=False,
        model=ModelConfig(path=str(work / "model_warm")),
        gen=GenerationConfig(k=4, temperature=1.0, max_new_tokens=8, batch_size=64, eval_batch_size=64),
        evolve=EvolveConfig(
            iterations=2,
            interval=1.0,
            steps_per_iteration=2,
            optim=OptimConfig(lr=1e-3, batch_size=6, micro_batch_size=micro, schedule="cosine"),
        ),
        eval=EvalConfig(pass_k=0),
    )


def checkpoint_digest(path: Path) -> dict:
    """Weights and optimizer state of a checkpoint folder, as digests and plain numbers."""
    model = load_model(path)
    trainer = torch.load(path / "trainer.pt", weights_only=True)
    opt = trainer["optimizer"]
    states = opt["deepspeed_adamw"] if "deepspeed_adamw" in opt else opt["state"]  # by name / id
    moments = [float(v.double().abs().sum()) for s in states.values() for v in s.values() if torch.is_tensor(v)]
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        saved_dtypes = sorted({str(f.get_slice(k).get_dtype()) for k in f.keys()})
    return {
        "weights": weights_digest(model),
        "saved_dtypes": saved_dtypes,
        "step": trainer["step"],
        "scheduler": trainer["scheduler"].get("last_epoch"),
        "moments_abs_sum": sum(moments),
        "state": json.loads((path / "state.json").read_text())["cursor"],
    }


def main(work: Path, mode: str = "ddp") -> None:
    torch.set_num_threads(1)
    if mode == "ddp":
        acc = make_accelerator(Config(device="cpu"))
    elif mode.startswith("deepspeed"):
        acc = deepspeed_accelerator(mode)
    else:
        acc = fsdp_accelerator(mode)
    # DeepSpeed steps inside backward: one forward/backward per step (micro-batch 0)
    micro = 0 if mode.startswith("deepspeed") else 2
    rank, world = acc.process_index, acc.num_processes
    assert world == 2, f"expected 2 processes, got {world} (launch with torchrun --nproc_per_node 2)"
    out: dict = {"rank": rank, "world": world, "seconds": {}, "distributed_type": str(acc.distributed_type)}
    if mode.startswith("fsdp"):
        out["fsdp_version"] = acc.state.fsdp_plugin.fsdp_version
    t0 = time.perf_counter()

    data = work / "data"
    if acc.is_main_process and not (work / "model_init" / "config.json").exists():
        from evostar.data.gym import build_gym
        from evostar.demo import gym_texts
        from evostar.models.tiny import build_tiny_qwen2_vl

        build_gym(data, seed=0, n_seed=8, n_train=16, n_val=8, n_test_id=4, n_test_ood=4)
        with full_weights():  # rank 0 alone: no ZeRO-3 partitioning (a collective)
            build_tiny_qwen2_vl(gym_texts(data), work / "model_init", seed=0)
    acc.wait_for_everyone()
    processor = load_processor(work / "model_init")
    io = VLMInputs(processor)
    train = load_samples(data / "train.json")
    val = load_samples(data / "val.json")
    out["seconds"]["setup"] = time.perf_counter() - t0

    # 1. One DDP step vs one single-process step on the same global batch.
    t0 = time.perf_counter()
    optim = OptimConfig(lr=1e-3, batch_size=5, micro_batch_size=micro, schedule="constant", max_grad_norm=1.0)
    examples = [Example(s, s.target) for s in train[:8]]
    model = load_model(work / "model_init")
    ddp = DistributedSFTTrainer(model, io, optim, accelerator=acc)
    ddp_stats = ddp.train(examples, 1, seed=123, progress=False)
    out["step_digest"] = assert_in_sync(acc, model)
    # how much of the model this rank's training module holds (FSDP: about 1/world)
    out["local_numel"] = sum(local_numel(p) for p in ddp.wrapped.parameters())
    out["full_numel"] = sum(p.numel() for p in model.parameters())
    if acc.is_main_process:
        ref_model = load_model(work / "model_init")
        ref = SFTTrainer(ref_model, io, optim)
        ref_stats = ref.train(examples, 1, seed=123, progress=False)
        ref_sd = ref_model.state_dict()
        diffs = [float((v - ref_sd[k]).abs().max()) for k, v in model.state_dict().items() if v.is_floating_point()]
        moved = [
            float((v - w).abs().max())
            for (k, v), w in zip(load_model(work / "model_init").state_dict().items(), ref_sd.values(), strict=True)
            if v.is_floating_point()
        ]
        # the distributed update against the reference update, as one vector over all weights
        init = load_model(work / "model_init").state_dict()
        sd = model.state_dict()
        num = sum(float(((sd[k] - init[k]) - (ref_sd[k] - init[k])).double().pow(2).sum()) for k in init)
        den = sum(float((ref_sd[k] - init[k]).double().pow(2).sum()) for k in init)
        out["step"] = {
            "max_abs_diff": max(diffs),
            "max_update": max(moved),
            "update_rel_diff": (num / den) ** 0.5,
            "ddp_loss": ddp_stats["loss"],
            "ref_loss": ref_stats["loss"],
            "ddp_tokens": ddp_stats["tokens"],
            "ref_tokens": ref_stats["tokens"],
        }
    out["seconds"]["step"] = time.perf_counter() - t0

    # 2. Teach the training answers (all ranks train together; rank 0 saves).
    t0 = time.perf_counter()
    model = load_model(work / "model_init")
    teach = OptimConfig(lr=3e-3, batch_size=16, schedule="constant", warmup_ratio=0.2)
    trainer = DistributedSFTTrainer(model, io, teach, accelerator=acc)
    stats = trainer.train([Example(s, s.target) for s in train], 30, seed=0, progress=False)
    out["memorize_loss"] = stats["loss"]
    out["memorize_digest"] = assert_in_sync(acc, model)
    if acc.is_main_process:
        save_model_and_processor(model, processor, work / "model_warm")
    acc.wait_for_everyone()
    out["seconds"]["memorize"] = time.perf_counter() - t0

    # 3. Run A: two iterations, uninterrupted.
    t0 = time.perf_counter()
    cfg = loop_config(work, work / "run_a", micro)
    model = load_model(cfg.model.path)
    model, state_a = loop(acc, cfg, SharedRunDir(cfg.output_dir, acc), model, io, train, val)
    out["a_digest"] = assert_in_sync(acc, model)
    out["seconds"]["run_a"] = time.perf_counter() - t0

    # 4. Run B: killed after iteration 1, then resumed with a freshly loaded model.
    t0 = time.perf_counter()
    cfg = loop_config(work, work / "run_b", micro)
    model = load_model(cfg.model.path)
    try:
        loop(acc, cfg, KilledAfter(Path(cfg.output_dir), acc, "iter_1"), model, io, train, val)
        raise AssertionError("run B was not killed")
    except Killed:
        pass
    model = load_model(cfg.model.path)
    run_b = SharedRunDir(cfg.output_dir, acc, resume=True)
    model, state_b = loop(acc, cfg, run_b, model, io, train, val)
    out["b_digest"] = assert_in_sync(acc, model)
    out["seconds"]["run_b"] = time.perf_counter() - t0

    # 5. A second trainer on the same module starts from the module's weights (warm-up ends by
    # restoring its best weights in the module; the loop's trainer must train from those).
    t0 = time.perf_counter()
    model = load_model(cfg.model.path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first = DistributedSFTTrainer(model, io, teach, accelerator=acc)
    first.train([Example(s, s.target) for s in train], 2, seed=1, progress=False)
    moved = max(float((v - before[k]).abs().max()) for k, v in model.state_dict().items())
    model.load_state_dict(before)
    second = DistributedSFTTrainer(model, io, teach, accelerator=acc)
    trained_on = second._full_state_dict() if second._copy else second.wrapped.state_dict()
    trained_on = {k.removeprefix("module."): v for k, v in trained_on.items()}
    out["reuse"] = {
        "moved": moved,
        "max_abs_diff": max(float((v - before[k]).abs().max()) for k, v in trained_on.items()),
    }
    # 6. The other loop modes: iterative RFT (fresh optimizer each iteration) and ReST-EM
    # (a fresh module each iteration, so a fresh training copy under FSDP).
    for loop_mode in ("iterative_rft", "rest_em"):
        cfg = loop_config(work, work / f"run_{loop_mode}", micro)
        cfg.evolve.mode = loop_mode
        model = load_model(cfg.model.path)
        model, state = loop(acc, cfg, SharedRunDir(cfg.output_dir, acc), model, io, train, val)
        out[f"{loop_mode}_digest"] = assert_in_sync(acc, model)
        out[f"{loop_mode}_kept"] = [r["kept"] for r in state.history]
        out[f"{loop_mode}_optimizer_steps"] = [r["optimizer_step"] for r in state.history]
    out["seconds"]["reuse_and_modes"] = time.perf_counter() - t0

    # 7. LoRA: only the adapters train, as in a single process on the same batches.
    t0 = time.perf_counter()
    lora_cfg = ModelConfig(path=str(work / "model_init"), lora_r=8)
    lora_optim = OptimConfig(lr=1e-3, batch_size=8, micro_batch_size=micro, max_grad_norm=1.0)
    lora_examples = [Example(s, s.target) for s in train]
    model = prepare_for_training(load_model(work / "model_init"), lora_cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lora_stats = DistributedSFTTrainer(model, io, lora_optim, accelerator=acc).train(
        lora_examples, 3, seed=0, progress=False
    )
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    out["lora"] = {"changed": len(changed), "only_adapters": all("lora_" in k for k in changed)}
    out["lora_digest"] = assert_in_sync(acc, model)
    if acc.is_main_process:
        ref = prepare_for_training(load_model(work / "model_init"), lora_cfg)
        ref_stats = SFTTrainer(ref, io, lora_optim).train(lora_examples, 3, seed=0, progress=False)
        ref_sd = ref.state_dict()
        out["lora"]["max_abs_diff"] = max(float((after[k] - ref_sd[k]).abs().max()) for k in ref_sd)
        out["lora"]["losses"] = [lora_stats["loss"], ref_stats["loss"]]
    out["seconds"]["lora"] = time.perf_counter() - t0

    if acc.is_main_process:

        def records(state):
            return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in state.history]

        out["a_records"], out["b_records"] = records(state_a), records(state_b)
        out["a_checkpoint"] = checkpoint_digest(work / "run_a" / "checkpoints" / "iter_2")
        out["b_checkpoint"] = checkpoint_digest(work / "run_b" / "checkpoints" / "iter_2")
        out["a_samples"] = (work / "run_a" / "samples" / "iter_002.jsonl").read_text()
        out["b_samples"] = (work / "run_b" / "samples" / "iter_002.jsonl").read_text()
    (work / f"result_rank{rank}.json").write_text(json.dumps(out, indent=1))
    acc.wait_for_everyone()
    acc.end_training()


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:])
