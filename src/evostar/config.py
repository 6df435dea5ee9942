"""Typed configs: dataclasses with a help string on every field, YAML in/out, CLI overrides.

`load_config("run.yaml", ["evolve.iterations=6", "gen.temperature=0.7"])` reads a YAML file
into `Config` and applies dotted `key=value` overrides, converting each value to the field's type.
Unknown keys are errors (a typo must not silently run the default).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


@dataclass
class ModelConfig:
    path: str = _f("", "HF checkpoint directory (or hub id) of the policy model.")
    trust_remote_code: bool = _f(False, "Allow custom modelling code (InternVL2, Phi-3.5-V, MiniCPM-V).")
    dtype: str = _f("float32", "Weights dtype: float32, bfloat16 or float16.")
    prompt_template: str = _f("{question}", "User-turn text; `{question}` is replaced by the question.")
    system_prompt: str = _f("", "Optional system turn.")
    lora_r: int = _f(0, "LoRA rank on the language model's linear layers (0: full fine-tuning).")
    lora_alpha: float = _f(16.0, "LoRA scale numerator (adapter output scaled by alpha / r).")
    lora_dropout: float = _f(0.0, "Dropout on the LoRA input (0 keeps CPU runs bitwise reproducible).")
    lora_targets: list[str] = _f(
        ["all-linear"],
        "Language-model linear layers to adapt (q_proj, v_proj, ...); all-linear: every one. "
        "The vision tower is never adapted.",
    )
    lora_train_projector: bool = _f(False, "With LoRA, also train the vision-to-text projector in full.")
    quantize_4bit: bool = _f(False, "QLoRA: 4-bit NF4 base via bitsandbytes; needs lora_r > 0 and a CUDA GPU.")
    freeze_vision: bool = _f(False, "Keep the vision encoder fixed (the projector still trains).")
    freeze_projector: bool = _f(False, "Keep the vision-to-text projector fixed.")
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward: less memory, ~30% more compute.")


@dataclass
class DataConfig:
    train: str = _f("", "Answer-only training prompts (MathV360K JSON, JSONL or MathVista format).")
    val: str = _f("", "Validation split for monitoring (greedy accuracy, Pass@K).")
    test: dict[str, str] = _f({}, "Test splits, name -> file, evaluated at the end.")
    seed_cot: str = _f("", "Gold chain-of-thought set for warm-up (empty: no warm-up).")
    image_root: str = _f("", "Folder image paths resolve against (default: each data file's folder).")
    max_train: int = _f(0, "Use at most this many training prompts (0: all).")
    max_val: int = _f(0, "Use at most this many validation prompts (0: all).")


@dataclass
class GenerationConfig:
    backend: str = _f("hf", "Rollout engine: hf (transformers generate) or vllm (evostar[vllm], CUDA GPU).")
    k: int = _f(8, "Responses sampled per prompt.")
    temperature: float = _f(1.0, "Sampling temperature (the adaptive controller may change it).")
    top_p: float = _f(1.0, "Nucleus sampling.")
    max_new_tokens: int = _f(64, "Longest response.")
    batch_size: int = _f(512, "Sequences per generate call (prompts x K).")
    workers: int = _f(
        1,
        "hf backend on CPU: processes that sample K responses in parallel, one thread each, over "
        "one shared copy of the weights (1: in this process with all its threads).",
    )
    rollout_dtype: str = _f(
        "",
        "hf backend on CPU: dtype of the sampling copy of the weights ('': sample from the policy "
        "itself; bfloat16 is ~2x faster on CPUs with bf16 matrix units). Greedy evaluation "
        "always uses the policy.",
    )
    eval_batch_size: int = _f(512, "Sequences per greedy evaluation call.")


@dataclass
class OptimConfig:
    lr: float = _f(5e-4, "Peak learning rate (AdamW).")
    min_lr_ratio: float = _f(0.1, "Final LR as a fraction of the peak (linear/cosine/wsd).")
    schedule: str = _f(
        "cosine",
        "constant, linear, cosine, or wsd (warmup-stable-decay: constant, then linear decay to "
        "min_lr_ratio over the last decay_ratio of the steps).",
    )
    decay_ratio: float = _f(0.2, "wsd: share of the steps, at the end, over which the LR decays.")
    warmup_ratio: float = _f(0.0, "Share of the steps with a linear LR warm-up.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    batch_size: int = _f(32, "Examples per optimizer step.")
    micro_batch_size: int = _f(0, "Examples per forward pass (0: whole batch).")
    max_grad_norm: float = _f(1.0, "Gradient clipping (0: off).")
    autocast: str = _f(
        "",
        "Mixed precision of the forward/backward: '' (off) or bf16 (fp16 is refused: it needs "
        "loss scaling); weights and AdamW stay in model.dtype (float32 recommended).",
    )


@dataclass
class WarmupConfig:
    steps: int = _f(0, "Optimizer steps of warm-up SFT on the gold chains of thought (0: skip).")
    eval_every: int = _f(100, "Evaluate greedy validation accuracy every this many steps.")
    hinted: bool = _f(
        False,
        "With no data.seed_cot: build the warm-up set by answer-hinted generation on data.train "
        "prompts (evostar.hinted; the paper's warm-up for instruction-tuned models).",
    )
    hinted_k: int = _f(4, "Responses sampled per hinted prompt.")
    hinted_temperature: float = _f(0.7, "Sampling temperature of the hinted responses.")
    hinted_max_prompts: int = _f(0, "Hinted prompts drawn at random from data.train (0: all).")
    hinted_keep_per_prompt: int = _f(1, "Correct hinted responses kept per prompt (distinct texts).")
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=1e-3, schedule="cosine", min_lr_ratio=0.05),
        metadata={"help": "Warm-up optimizer (separate from the self-evolving one)."},
    )


@dataclass
class EvolveConfig:
    iterations: int = _f(4, "Self-evolving iterations.")
    interval: float = _f(0.25, "Share of the training prompts one iteration consumes (next slice each time).")
    mode: str = _f(
        "continuous",
        "continuous (one optimizer + schedule for the run), iterative_rft (optimizer re-created each "
        "iteration) or rest_em (restart from the initial model and re-create the optimizer).",
    )
    steps_per_iteration: int = _f(0, "Optimizer steps of SFT per iteration (0: epochs_per_iteration passes).")
    epochs_per_iteration: float = _f(1.0, "Passes over the selected responses per iteration (steps_per_iteration=0).")
    selection: str = _f("all", "all (every correct response), random_k, top_k (by score) or threshold.")
    select_k: int = _f(2, "Responses kept per prompt for random_k / top_k.")
    threshold: float = _f(0.5, "Minimum score for threshold selection.")
    dedupe: bool = _f(
        False,
        "Keep one copy of identical correct responses of a prompt (off: a response sampled often "
        "weighs more, as in the paper).",
    )
    optim: OptimConfig = field(default_factory=OptimConfig, metadata={"help": "Self-evolving optimizer."})


@dataclass
class EvalConfig:
    pass_k: int = _f(8, "K of Pass@K on the validation split each iteration (0: skip).")
    pass_temperature: float = _f(1.0, "Temperature of the Pass@K samples (the loop's own T when negative).")
    pass_prompts: int = _f(0, "Validation prompts used for Pass@K (0: all; the first N otherwise).")


@dataclass
class Config:
    output_dir: str = _f("runs/evolve", "Run directory (config, metrics, samples, checkpoints).")
    seed: int = _f(0, "Seed of every random choice; the same seed gives the same run on CPU.")
    threads: int = _f(0, "torch CPU threads (0: all cores).")
    device: str = _f("auto", "cpu, cuda or auto.")
    progress: bool = _f(True, "Show progress bars.")
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "Policy model."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "Data files."})
    gen: GenerationConfig = field(default_factory=GenerationConfig, metadata={"help": "Rollouts."})
    warmup: WarmupConfig = field(default_factory=WarmupConfig, metadata={"help": "Warm-up SFT."})
    evolve: EvolveConfig = field(default_factory=EvolveConfig, metadata={"help": "The loop."})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "Monitoring."})


# ---------------------------------------------------------------------------------------------
def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: dict[str, Any], where: str = "config") -> Any:
    """Build a dataclass from a nested dict, type-checking every value."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(names)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}.{name}")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _coerce(args[0], value, where)
    if origin is list:
        if isinstance(value, str):  # `model.lora_targets=q_proj,v_proj` on the command line
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [str(v) for v in value]
    if origin is dict:
        if isinstance(value, str):  # `data.test=path` on the command line
            return {Path(value).stem: value} if value else {}
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): str(v) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp in (int, float):
        try:
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return tp(float(value)) if tp is int else tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from None
    if tp is str:
        return "" if value is None else str(value)
    return value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. evolve.iterations=6)")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    data: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"{p}: config file not found")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{p}: not valid YAML: {err}") from None
    base = to_dict(Config())
    _deep_update(base, data)
    apply_overrides(base, overrides or [])
    return from_dict(Config, base, where=str(path or "config"))


def _deep_update(base: dict, new: dict) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict) and key != "test":
            _deep_update(base[key], value)
        else:
            base[key] = value


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every field, for `evostar config --help`-style listings."""
    rows = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            rows += describe(type(default), key + ".")
        else:
            rows.append((key, repr(default), f.metadata.get("help", "")))
    return rows
