"""SFT throughput: evostar's `SFTTrainer` vs TRL's `SFTTrainer` on the tiny Qwen2-VL.

Both train the same random-init weights (reloaded for every run) on the same gym seed chains of
thought for the same number of optimizer steps, batch size, learning rate (constant), AdamW
(betas 0.9/0.999, no weight decay), gradient clipping at 1.0, on CPU with the same threads.
Each runs twice: in float32, and under its bf16 autocast (evostar's `optim.autocast=bf16`, TRL's
`bf16=True`), weights and AdamW in float32 for both. TRL gets the conversational
`prompt`/`completion` format with an `images` column, so its collator masks the prompt and image
tokens like evostar's, and the model with transformers' own sdpa attention (evostar's loader
switches CPU models to `evostar.models.attention`); gradient checkpointing, logging, evaluation
and saving are off. Reported: loss tokens/s (response tokens that carry
loss), total tokens/s (every non-padding token the model processes) and steps/s. Before timing,
the initial loss of both on the same first batch is printed, to show they optimise the same
objective.

    python benchmarks/bench_sft.py --out sft.json
    python benchmarks/bench_sft.py --quick          # seconds; smoke test only
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from _common import (
    default_workdir,
    load_split,
    log,
    machine_info,
    median,
    prepare_gym,
    prepare_tiny_model,
    print_table,
    ratio,
    setup_torch,
    write_json,
)

from evostar.config import OptimConfig
from evostar.models.attention import use_stock_attention
from evostar.models.hub import load_model_and_processor
from evostar.models.inputs import VLMInputs
from evostar.train import Example, SFTTrainer

FULL = dict(examples=200, batch_size=32, steps=30, repeats=3)
QUICK = dict(examples=16, batch_size=4, steps=3, repeats=1)
MAX_GRAD_NORM = 1.0


def count_tokens(batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(loss tokens after the causal shift, non-padding tokens) of a collated batch."""
    return int((batch["labels"][:, 1:] != -100).sum()), int(batch["attention_mask"].sum())


class CountingInputs(VLMInputs):
    """evostar's inputs, recording (loss tokens, total tokens) of every SFT batch they build."""

    def __init__(self, processor: Any) -> None:
        super().__init__(processor)
        self.counts: list[tuple[int, int]] = []

    def collate_sft(self, *a: Any, **kw: Any) -> dict[str, torch.Tensor]:
        batch = super().collate_sft(*a, **kw)
        self.counts.append(count_tokens(batch))
        return batch


def run_evostar(
    model_dir: Path, samples: Sequence[Any], cfg: dict[str, Any], seed: int, bf16: bool = False
) -> dict[str, Any]:
    """One timed `SFTTrainer.train` of `steps` steps from fresh weights and a cold encoding cache."""
    model, processor = load_model_and_processor(model_dir)
    io = CountingInputs(processor)
    optim = OptimConfig(
        lr=cfg["lr"],
        schedule="constant",
        batch_size=cfg["batch_size"],
        weight_decay=0.0,
        max_grad_norm=MAX_GRAD_NORM,
        autocast="bf16" if bf16 else "",
    )
    trainer = SFTTrainer(model, io, optim)
    examples = [Example(s, s.target) for s in samples]
    stamps: list[float] = []
    t0 = time.perf_counter()
    trainer.train(
        examples, cfg["steps"], seed=seed, progress=False, on_step=lambda *_: stamps.append(time.perf_counter())
    )
    return summarize(time.perf_counter() - t0, stamps, io.counts, cfg["steps"])


def trl_dataset(samples: Sequence[Any]) -> Any:
    """TRL's conversational prompt-completion format for VLMs: `images`, `prompt`, `completion`."""
    from datasets import Dataset
    from PIL import Image

    rows = []
    for s in samples:
        with Image.open(s.image) as im:
            img = im.convert("RGB")
        rows.append(
            {
                "images": [img],
                "prompt": [{"role": "user", "content": s.question}],
                "completion": [{"role": "assistant", "content": s.target}],
            }
        )
    return Dataset.from_list(rows)


def make_trl_trainer(
    model_dir: Path, dataset: Any, cfg: dict[str, Any], seed: int, out_dir: str, bf16: bool = False
) -> Any:
    from accelerate.state import AcceleratorState
    from transformers import PrinterCallback, TrainerCallback
    from trl import SFTConfig
    from trl import SFTTrainer as TRLSFTTrainer

    # accelerate keeps one process-wide state: without a reset a trainer would inherit the mixed
    # precision of the previous one (bf16 or not)
    AcceleratorState._reset_state(reset_partial_state=True)
    model, processor = load_model_and_processor(model_dir)
    use_stock_attention(model)  # transformers' attention, as a TRL user has it
    # the option's name changed in transformers 5.2x (gradient_ -> activation_checkpointing)
    fields = {f.name for f in dataclasses.fields(SFTConfig)}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    args = SFTConfig(
        output_dir=out_dir,
        per_device_train_batch_size=cfg["batch_size"],
        gradient_accumulation_steps=1,
        max_steps=cfg["steps"],
        learning_rate=cfg["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        max_grad_norm=MAX_GRAD_NORM,
        use_cpu=True,
        bf16=bf16,
        fp16=False,
        **{checkpointing: False},
        max_length=None,
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_drop_last=True,
        seed=seed,
    )
    trainer = TRLSFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor)
    precision = trainer.accelerator.mixed_precision
    assert precision == ("bf16" if bf16 else "no"), f"TRL trainer runs with mixed precision {precision!r}"

    class Stamps(TrainerCallback):
        def __init__(self) -> None:
            self.stamps: list[float] = []

        def on_step_end(self, *a: Any, **kw: Any) -> None:
            self.stamps.append(time.perf_counter())

    assert not (args.fp16 or getattr(args, checkpointing)), "no fp16, no checkpointing, like evostar"
    trainer.remove_callback(PrinterCallback)  # it prints the final metrics dict
    trainer.bench_stamps = Stamps()
    trainer.add_callback(trainer.bench_stamps)
    collate = trainer.data_collator
    trainer.bench_counts = []

    def counting_collator(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = collate(examples)
        trainer.bench_counts.append(count_tokens(batch))
        return batch

    trainer.data_collator = counting_collator
    return trainer


def run_trl(model_dir: Path, dataset: Any, cfg: dict[str, Any], seed: int, bf16: bool = False) -> dict[str, Any]:
    """One timed `trainer.train()` of `steps` steps from fresh weights (construction untimed)."""
    with tempfile.TemporaryDirectory() as out_dir:
        trainer = make_trl_trainer(model_dir, dataset, cfg, seed, out_dir, bf16)
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
    # The dataloader may collate one batch ahead of the last step: keep the first `steps` batches.
    return summarize(seconds, trainer.bench_stamps.stamps, trainer.bench_counts, cfg["steps"])


def summarize(seconds: float, stamps: list[float], counts: list[tuple[int, int]], steps: int) -> dict[str, Any]:
    counts = counts[:steps]
    assert len(counts) == steps == len(stamps), (len(counts), steps, len(stamps))
    loss_tokens, total_tokens = sum(c[0] for c in counts), sum(c[1] for c in counts)
    out = {
        "seconds": seconds,
        "steps": steps,
        "loss_tokens": loss_tokens,
        "total_tokens": total_tokens,
        "loss_tokens_per_s": loss_tokens / seconds,
        "total_tokens_per_s": total_tokens / seconds,
        "steps_per_s": steps / seconds,
    }
    if steps > 1:  # steady state: from the end of step 1 to the end of the last step
        span = stamps[-1] - stamps[0]
        out["steady_loss_tokens_per_s"] = sum(c[0] for c in counts[1:]) / span
    return out


def initial_losses(model_dir: Path, samples: Sequence[Any], dataset: Any, cfg: dict[str, Any]) -> dict[str, Any]:
    """Loss of the initial weights on the same first batch, each framework collating its way."""
    bs = cfg["batch_size"]
    model, processor = load_model_and_processor(model_dir)
    io = VLMInputs(processor)
    batch = io.collate_sft(samples[:bs], [s.target for s in samples[:bs]])
    labels = batch.pop("labels")
    with torch.no_grad():  # evostar's objective: token-mean NLL of the response tokens (train.py)
        logits = model(**batch).logits[:, :-1].float()
        evo = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
        )
    out: dict[str, Any] = {"evostar": {"loss": float(evo), "loss_tokens": count_tokens({**batch, "labels": labels})[0]}}
    with tempfile.TemporaryDirectory() as out_dir:
        trainer = make_trl_trainer(model_dir, dataset, cfg, 0, out_dir)
        trl_batch = trainer.data_collator([dict(dataset[i]) for i in range(bs)])
        with torch.no_grad():
            trl = trainer.compute_loss(trainer.model, dict(trl_batch))
    out["trl"] = {"loss": float(trl), "loss_tokens": count_tokens(trl_batch)[0], "optim": str(trainer.args.optim)}
    out["relative_difference"] = abs(out["trl"]["loss"] - out["evostar"]["loss"]) / out["evostar"]["loss"]
    out["comparable"] = out["relative_difference"] < 0.05
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, help=f"seed chains of thought trained on (default {FULL['examples']})")
    p.add_argument("--batch-size", type=int, help=f"examples per optimizer step (default {FULL['batch_size']})")
    p.add_argument("--steps", type=int, help=f"optimizer steps per timed run (default {FULL['steps']})")
    p.add_argument("--repeats", type=int, help=f"timed repeats, median reported (default {FULL['repeats']})")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None, help="cache for gym and model (default: temp dir)")
    p.add_argument("--out", type=Path, default=None, help="write the result JSON here")
    p.add_argument("--quick", action="store_true", help="tiny sizes, 1 repeat: a smoke test, not a measurement")
    args = p.parse_args(argv)
    base = QUICK if args.quick else FULL
    cfg = {key: getattr(args, key) if getattr(args, key) is not None else val for key, val in base.items()}
    cfg.update(lr=args.lr, threads=args.threads, seed=args.seed, quick=args.quick)
    setup_torch(args.threads)

    workdir = args.workdir or default_workdir()
    gym = prepare_gym(workdir, n_seed=cfg["examples"], n_train=0, seed=args.seed)
    model_dir = prepare_tiny_model(workdir, gym, seed=args.seed)
    samples = load_split(gym, "seed", cfg["examples"])
    log(
        f"{len(samples)} seed examples, batch {cfg['batch_size']}, {cfg['steps']} steps, lr {cfg['lr']} "
        f"(constant), fp32, {torch.get_num_threads()} threads, random-init tiny Qwen2-VL"
    )

    result: dict[str, Any] = {"benchmark": "sft", "config": cfg, "machine": machine_info()}
    precisions = {"fp32": False, "bf16": True}
    runners = {}
    for tag, bf16 in precisions.items():
        name = "evostar" if tag == "fp32" else f"evostar-{tag}"
        runners[name] = lambda c, seed, bf16=bf16: run_evostar(model_dir, samples, c, seed, bf16)
    warm_cfg = {**cfg, "steps": min(2, cfg["steps"])}
    for run in list(runners.values()):
        run(warm_cfg, args.seed)  # warm-up run, untimed
    try:
        dataset = trl_dataset(samples)
        check = initial_losses(model_dir, samples, dataset, cfg)
        result["initial_loss"] = check
        log(
            f"initial loss on the same first {cfg['batch_size']} examples: evostar {check['evostar']['loss']:.4f} "
            f"({check['evostar']['loss_tokens']} loss tokens), TRL {check['trl']['loss']:.4f} "
            f"({check['trl']['loss_tokens']} loss tokens): relative difference "
            f"{check['relative_difference']:.2%} -> {'comparable' if check['comparable'] else 'NOT comparable'}"
        )
        if check["trl"]["loss_tokens"] != check["evostar"]["loss_tokens"]:
            log(
                "  (TRL's completion is the chat template's text after the prompt: it also trains on the "
                "newline after the end-of-turn token)"
            )
        for tag, bf16 in precisions.items():
            run_trl(model_dir, dataset, warm_cfg, args.seed, bf16)  # warm-up run, untimed
            name = "trl" if tag == "fp32" else f"trl-{tag}"
            runners[name] = lambda c, seed, bf16=bf16: run_trl(model_dir, dataset, c, seed, bf16)
    except Exception as err:  # TRL missing or unable to run this VLM: still report evostar
        traceback.print_exc()
        log(f"TRL SFTTrainer cannot run here ({type(err).__name__}: {err}); reporting evostar only")
        result["trl_error"] = f"{type(err).__name__}: {err}"

    backends = list(runners)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in backends}
    for r in range(cfg["repeats"]):
        for name in backends if r % 2 == 0 else backends[::-1]:  # alternate to cancel drift
            runs[name].append(runners[name](cfg, args.seed + r))
            m = runs[name][-1]
            log(f"  repeat {r + 1} {name:13s} {m['seconds']:7.2f} s  {m['loss_tokens_per_s']:9.1f} loss tok/s")

    keys = ["loss_tokens_per_s", "total_tokens_per_s", "steps_per_s", "steady_loss_tokens_per_s"]
    for name, rs in runs.items():
        result[name] = {key: median([m[key] for m in rs]) for key in keys if key in rs[0]}
        result[name].update(
            seconds=median([m["seconds"] for m in rs]),
            loss_tokens=rs[0]["loss_tokens"],
            total_tokens=rs[0]["total_tokens"],
            runs=rs,
        )
    # evostar / TRL at the same precision, and each evostar against TRL's fastest precision
    pairs = {"evostar": ("evostar", "trl"), "evostar-bf16": ("evostar-bf16", "trl-bf16")}
    if "trl" in runs:
        fastest = max(("trl", "trl-bf16"), key=lambda n: result[n]["loss_tokens_per_s"])
        result["trl_fastest"] = fastest
        pairs.update({f"{n} vs fastest TRL": (n, fastest) for n in ("evostar", "evostar-bf16")})
        result["ratio"] = {
            label: {key: ratio(result[a][key], result[b][key]) for key in keys if key in result[a]}
            for label, (a, b) in pairs.items()
        }
        result["ratio"].update(result["ratio"]["evostar"])  # flat fp32 keys, as before
    log("")
    rows = [
        [
            n,
            result[n]["seconds"],
            result[n]["steps_per_s"],
            result[n]["loss_tokens_per_s"],
            result[n]["total_tokens_per_s"],
            result[n].get("steady_loss_tokens_per_s", float("nan")),
        ]
        for n in backends
    ]
    for label in ("evostar", "evostar-bf16", "evostar vs fastest TRL", "evostar-bf16 vs fastest TRL"):
        if label not in result.get("ratio", {}):
            continue
        rt = result["ratio"][label]
        a, b = pairs[label]
        rows.append(
            [
                f"{a} / {b}" + (" (fastest TRL)" if "fastest" in label else ""),
                "",
                rt["steps_per_s"],
                rt["loss_tokens_per_s"],
                rt["total_tokens_per_s"],
                rt.get("steady_loss_tokens_per_s", float("nan")),
            ]
        )
    print_table(["backend", "seconds", "steps/s", "loss tok/s", "total tok/s", "steady loss tok/s"], rows)
    log(f"(median of {cfg['repeats']} repeat(s) after a warm-up run; compare ratios within one run)")
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
