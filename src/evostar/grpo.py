"""The online-RL peer baseline: GRPO (TRL's `GRPOTrainer`) from a finished run's warm-up.

M-STaR's claim is about self-evolving *offline* rounds of generate -> select -> SFT; the obvious
question is whether on-policy RL with the same reward does as well. `run_grpo` answers it on equal
terms: the same warm-up weights, the same training prompts and images rendered into exactly the
prompt tokens evostar trains and evaluates with, the same outcome reward (evostar's own answer
extraction and matching), the same K, temperature and response length, and the same greedy
evaluation on val and every test split. Only the update rule differs, and it is TRL's, not ours.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback

from evostar.config import Config, build_config
from evostar.context import prompt_encoder, with_added_sections
from evostar.errors import RunDirError
from evostar.evaluate import evaluate
from evostar.models.hub import load_policy, transformers_model
from evostar.models.inputs import VLMInputs
from evostar.pipeline import load_data
from evostar.records import Sample
from evostar.reward.answer import answers_match, extract_answer
from evostar.rundir import atomic_write_json, read_json

__all__ = ["grpo_reward", "grpo_trainer", "load_shared", "run_grpo"]

_NO_LIMIT_STEPS = 10**9
"""`max_steps` under a wall-clock budget: the time callback ends training long before."""


# --------------------------------------------------------------------------------- inputs
def _rows(io: VLMInputs, samples: list[Sample]):
    """A `datasets` transform: row index -> TRL's columns, with the image opened only when the
    row is drawn (the gym's images are files; a whole training set of PIL images is not needed)."""
    from PIL import Image

    def transform(batch: dict[str, list]) -> dict[str, list]:
        cols: dict[str, list] = {"prompt": [], "answer": [], "choices": [], "image": []}
        for i in batch["idx"]:
            s = samples[i]
            cols["prompt"].append(io.messages(s))  # TRL renders it with the same chat template
            cols["answer"].append(s.answer)
            cols["choices"].append(s.choices)
            if s.image is None:
                cols["image"].append(None)
            else:
                with Image.open(s.image) as img:  # what `VLMInputs.encode_prompt` feeds the processor
                    cols["image"].append(img.convert("RGB"))
        if all(img is None for img in cols["image"]):
            del cols["image"]  # TRL then takes the text-only path
        return cols

    return transform


def _train_dataset(io: VLMInputs, samples: list[Sample]):
    import datasets

    ds = datasets.Dataset.from_dict({"idx": list(range(len(samples)))})
    ds.set_transform(_rows(io, samples))
    return ds


def grpo_reward(
    prompts: list, completions: list, answer: list[str | None], choices: list[list[str] | None], **_: Any
) -> list[float]:
    """evostar's outcome reward: 1.0 when the extracted final answer matches the gold one."""
    rewards = []
    for completion, gold, opts in zip(completions, answer, choices, strict=True):
        text = completion[-1]["content"] if isinstance(completion, list) else completion
        if isinstance(text, list):  # content parts
            text = "".join(p.get("text") or "" for p in text if isinstance(p, dict))
        ok = gold is not None and answers_match(extract_answer(str(text).strip()), gold, opts)
        rewards.append(1.0 if ok else 0.0)
    return rewards


# --------------------------------------------------------------------------------- run
class _WallClockStop(TrainerCallback):
    """Stops training after `seconds` of wall clock, checked after each optimizer step."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.t0 = time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.seconds > 0 and time.perf_counter() - self.t0 >= self.seconds:
            control.should_training_stop = True
        return control


@contextlib.contextmanager
def _quiet_deprecations() -> Iterator[None]:
    """Hide transformers' `gradient_checkpointing` renaming warnings, which TRL's own calls raise
    on every run whatever its arguments."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"`\w*gradient_checkpointing\w*` is deprecated", FutureWarning)
        yield


def load_shared(shared: Path) -> tuple[Config, Path]:
    """The shared run's config and its warm-up checkpoint, or a RunDirError naming the path."""
    config_path = shared / "config.yaml"
    if not config_path.is_file():
        raise RunDirError(f"{shared}: not a run directory (no config.yaml) to start GRPO from")
    saved = with_added_sections(yaml.safe_load(config_path.read_text(encoding="utf-8")))
    cfg = build_config(saved, source=str(config_path))
    progress = read_json(shared / "progress.json", "run's progress") if (shared / "progress.json").is_file() else {}
    checkpoint = shared / "checkpoints" / "warmup"
    if cfg.warmup.steps == 0:
        raise RunDirError(f"{shared}: the run has no warm-up (warmup.steps=0), so there is no checkpoint to train")
    if "warmup" not in progress.get("completed", []) or not (checkpoint / "config.json").is_file():
        raise RunDirError(f"{shared}: its warm-up has not finished ({checkpoint} is missing); nothing to train yet")
    return cfg, checkpoint


def _batch_shape(cfg: Config, n_train: int) -> tuple[int, int]:
    """(per-device batch, accumulation steps): an optimizer step sees about
    `evolve.optim.batch_size` completions, whole groups of K, as the loop's SFT step does."""
    k = cfg.gen.k
    prompts = max(1, min(n_train, math.ceil(cfg.evolve.optim.batch_size / k)))
    total = prompts * k
    micro = cfg.evolve.optim.micro_batch_size
    if micro <= 0 or micro >= total or total % micro:
        return total, 1
    return micro, total // micro


def _reward_means(log_history: list[dict]) -> tuple[float | None, float | None]:
    rewards = [row["reward"] for row in log_history if "reward" in row]
    return (rewards[0], rewards[-1]) if rewards else (None, None)


def grpo_trainer(
    cfg: Config,
    io: VLMInputs,
    model: torch.nn.Module,
    train: list[Sample],
    output_dir: Path,
    *,
    lr: float,
    seed: int,
    max_steps: int = 0,
    max_seconds: float = 0.0,
    progress: bool = False,
):
    """TRL's `GRPOTrainer` on `train` with the run's generation settings and evostar's reward:
    K samples per prompt at `gen.temperature` / `gen.top_p`, `gen.max_new_tokens` long, stopping
    where evostar's sampler stops; a constant LR; `max_steps` steps, else `max_seconds`."""
    from trl import GRPOConfig, GRPOTrainer

    # Stop where evostar's sampler stops (end of turn or eos); TRL reads the model's eos ids.
    model.generation_config.eos_token_id = list(io.stop_token_ids)
    model.generation_config.pad_token_id = io.pad_id
    per_device, accumulation = _batch_shape(cfg, len(train))
    with _quiet_deprecations():
        args = GRPOConfig(
            output_dir=str(output_dir),
            use_cpu=True,
            use_vllm=False,
            report_to="none",
            seed=seed,
            data_seed=seed,
            learning_rate=lr,
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=cfg.evolve.optim.weight_decay,
            max_grad_norm=cfg.evolve.optim.max_grad_norm,
            max_steps=max_steps if max_steps > 0 else _NO_LIMIT_STEPS,
            per_device_train_batch_size=per_device,
            gradient_accumulation_steps=accumulation,
            num_generations=cfg.gen.k,
            temperature=cfg.gen.temperature,
            top_p=cfg.gen.top_p,
            top_k=0,
            max_completion_length=cfg.gen.max_new_tokens,
            logging_steps=1,
            save_strategy="no",
            disable_tqdm=not progress,
            dataloader_num_workers=0,
            remove_unused_columns=False,
            bf16=False,
            fp16=False,
        )
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=grpo_reward,
            args=args,
            train_dataset=_train_dataset(io, train),
            processing_class=io.processor,
            callbacks=[_WallClockStop(max_seconds if max_steps <= 0 else 0.0)],
        )
    if not progress:  # without tqdm the Trainer prints every step's log dict instead
        trainer.remove_callback(PrinterCallback)
    return trainer


def run_grpo(
    shared: Path,
    out: Path,
    *,
    lr: float,
    seed: int,
    max_steps: int = 0,
    max_seconds: float = 0.0,
    progress: bool = False,
) -> dict:
    """GRPO on `shared`'s training prompts from its warm-up weights, for `max_steps` optimizer
    steps (or, when 0, `max_seconds` of training); then greedy val and test accuracy.

    Writes `out/model` and `out/result.json`; an existing result.json is returned as it is, so an
    ablation resumes by calling again.
    """
    shared, out = Path(shared), Path(out)
    if max_steps <= 0 and max_seconds <= 0:
        raise ValueError("run_grpo: give max_steps > 0 or max_seconds > 0")
    if (out / "result.json").is_file():
        return read_json(out / "result.json", "GRPO result")
    t_start = time.perf_counter()
    cfg, checkpoint = load_shared(shared)
    data = load_data(cfg)
    io = prompt_encoder(cfg)
    if not progress:  # transformers' own bars (loading and writing weights) too, as `open_run` does
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    torch.set_flush_denormal(True)  # as the loop does: tiny Adam moments turn denormal and slow on CPU
    model = load_policy(cfg.model, checkpoint, device="cpu")
    trainer = grpo_trainer(
        cfg,
        io,
        model,
        data.train,
        out / "trainer",
        lr=lr,
        seed=seed,
        max_steps=max_steps,
        max_seconds=max_seconds,
        progress=progress,
    )
    t_train = time.perf_counter()
    with _quiet_deprecations():
        trainer.train()
    train_seconds = time.perf_counter() - t_train
    model = transformers_model(trainer.model)
    if hasattr(trainer.model, "merge_and_unload"):  # LoRA: save whole weights, like a full fine-tune
        model = trainer.model.merge_and_unload()
    model.eval()

    def accuracy(samples: list[Sample], desc: str) -> float | None:
        return evaluate(model, io, samples, cfg.gen, desc=desc, progress=progress)[0]["accuracy"]

    val_accuracy = accuracy(data.val, "grpo val")
    tests = {name: accuracy(samples, f"grpo {name}") for name, samples in data.tests.items()}
    if (out / "model").exists():  # a killed earlier attempt: its weights are not these
        shutil.rmtree(out / "model")
    model.save_pretrained(out / "model")
    io.processor.save_pretrained(out / "model")
    shutil.rmtree(out / "trainer", ignore_errors=True)
    first, last = _reward_means(trainer.state.log_history)
    result = {
        "lr": lr,
        "steps": int(trainer.state.global_step),
        "train_seconds": train_seconds,
        "seconds": time.perf_counter() - t_start,
        "val_accuracy": val_accuracy,
        "tests": tests,
        "reward_mean_first": first,
        "reward_mean_last": last,
        "seed": seed,
    }
    atomic_write_json(out / "result.json", result)
    return result
