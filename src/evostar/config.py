"""Typed configs: the single place every choice, range and default of a run is declared.

Each field carries its help string, and its allowed values: a `Literal` type for choices, bounds
(`ge`, `gt`, `le`, `lt`) or a check function for everything else. `__post_init__` enforces
them, so a bad value is refused when the config is built (from YAML, `key=value` overrides or
Python) with the key, the value and what is allowed, before any compute::

    cfg = load_config("run.yaml", ["evolve.iterations=6", "gen.temperature=0.7"])

Unknown keys are errors (a typo must not silently run the default). What only the machine can
answer (is there a CUDA device, is vLLM installed) is checked at the start of a run by
`evostar.launch.check_environment`. `resume_conflicts` lists the keys a `--resume` may not change.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from evostar.errors import UserError

Schedule = Literal["constant", "linear", "cosine", "wsd"]
Mode = Literal["continuous", "iterative_rft", "rest_em"]
Selection = Literal["all", "random_k", "top_k", "threshold"]
Backend = Literal["hf", "vllm"]
DType = Literal["float32", "bfloat16", "float16"]
RolloutDType = Literal["", "float32", "bfloat16", "float16"]
Autocast = Literal["", "bf16"]
PRMStrategy = Literal["binary", "every"]
PRMLabel = Literal["hard", "soft"]
PRMAggregate = Literal["min", "mean", "last", "product"]
Controller = Literal["static", "reward_pass", "pass_at_k", "balance"]
PseudoLabel = Literal["majority", "prm_weighted", "oracle"]

SCORED_SELECTIONS = ("top_k", "threshold")
"""Selections that rank by `Response.score`; refused unless the PRM (`prm.enabled`) fills it."""


class ConfigError(UserError):
    """A config value that does not fit the schema: `key` (dotted), `value` and the reason."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key

    def under(self, prefix: str) -> ConfigError:
        """The same error with `prefix.` in front of its key (a nested section's field)."""
        if self.key is None:
            return ConfigError(f"{prefix}: {self}")
        reason = str(self)[len(self.key) :]
        return ConfigError(f"{prefix}.{self.key}{reason}", f"{prefix}.{self.key}")


def refuse(key: str, value: Any, reason: str) -> ConfigError:
    return ConfigError(f"{key}={value!r}: {reason}", key)


def _f(
    default: Any,
    help: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    check: Callable[[Any], str | None] | None = None,
    allowed: str = "",
    resume_safe: bool = False,
) -> Any:
    """A field with its help, its bounds or check (`check(value)` returns what is wrong, or
    None), the allowed values in words for listings, and whether a resumed run may change it
    (only keys that change speed or logging, never results)."""
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt, "check": check, "resume_safe": resume_safe}
    meta["allowed"] = allowed or _bounds_text(ge, gt, le, lt)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def _section(cls: type, help: str, factory: Callable[[], Any] | None = None) -> Any:
    return field(default_factory=factory or cls, metadata={"help": help})


def _bounds_text(ge: Any, gt: Any, le: Any, lt: Any) -> str:
    low = f">= {ge}" if ge is not None else f"> {gt}" if gt is not None else ""
    high = f"<= {le}" if le is not None else f"< {lt}" if lt is not None else ""
    return " and ".join(p for p in (low, high) if p)


def _choices(tp: Any) -> tuple[Any, ...] | None:
    """The allowed values of a `Literal` type (also inside `X | None`)."""
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if typing.get_origin(arg) is Literal:
                return typing.get_args(arg)
    return None


def check_fields(section: Any) -> None:
    """Refuse any field of a config dataclass that is outside its declared choices or range."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        value, meta = getattr(section, f.name), f.metadata
        if value is None or dataclasses.is_dataclass(value):
            continue
        expected = hints[f.name]
        if expected in (int, float, bool, str) and not _is_a(value, expected):
            raise refuse(f.name, value, f"expected {expected.__name__}, got {type(value).__name__}")
        if meta.get("check") is not None and (problem := meta["check"](value)):
            raise refuse(f.name, value, problem)
        choices = _choices(expected)
        if choices is not None and value not in choices:
            raise refuse(f.name, value, f"choose one of {list(choices)}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if isinstance(value, float) and not math.isfinite(value):
                raise refuse(f.name, value, "not a finite number")
            if not _within(value, meta):
                raise refuse(f.name, value, f"must be {meta['allowed']}")


def _is_a(value: Any, tp: type) -> bool:
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _within(value: float, meta: Any) -> bool:
    ge, gt, le, lt = (meta.get(b) for b in ("ge", "gt", "le", "lt"))
    return (
        (ge is None or value >= ge)
        and (gt is None or value > gt)
        and (le is None or value <= le)
        and (lt is None or value < lt)
    )


class _Checked:
    """Base of every config section: validates its fields when built."""

    def __post_init__(self) -> None:
        check_fields(self)


# --------------------------------------------------------------------------------- checks
def _template_problem(template: str) -> str | None:
    if "{question}" not in template:
        return "must contain {question} (where the question goes)"
    try:
        template.format(question="")
    except (KeyError, IndexError, ValueError) as err:
        return f"not a format string with only {{question}} in it ({err!r}); write braces as {{{{ }}}}"
    return None


def _device_problem(device: str) -> str | None:
    if re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        return None
    return "choose auto, cpu, cuda or cuda:N"


def _not_empty(what: str) -> Callable[[Any], str | None]:
    return lambda value: None if value else f"empty: give {what}"


# --------------------------------------------------------------------------------- sections
@dataclass
class ModelConfig(_Checked):
    path: str = _f("", "HF checkpoint directory (or hub id) of the policy model.")
    trust_remote_code: bool = _f(
        False, "Allow custom modelling code shipped with the checkpoint (config.json auto_map)."
    )
    dtype: DType = _f("float32", "Dtype of the weights, gradients and AdamW moments.")
    prompt_template: str = _f(
        "{question}",
        "User-turn text; `{question}` is replaced by the question.",
        check=_template_problem,
        allowed="text containing {question}",
    )
    system_prompt: str = _f("", "Optional system turn.")
    lora_r: int = _f(0, "LoRA rank on the language model's linear layers (0: full fine-tuning).", ge=0)
    lora_alpha: float = _f(16.0, "LoRA scale numerator (adapter output scaled by alpha / r).", gt=0)
    lora_dropout: float = _f(0.0, "Dropout on the LoRA input (0 keeps CPU runs bitwise reproducible).", ge=0, lt=1)
    lora_targets: list[str] = _f(
        ["all-linear"],
        "Language-model linear layers to adapt (q_proj, v_proj, ...); all-linear: every one. "
        "The vision tower is never adapted.",
        check=_not_empty("at least one layer name, or all-linear"),
    )
    lora_train_projector: bool = _f(False, "With LoRA, also train the vision-to-text projector in full.")
    quantize_4bit: bool = _f(False, "QLoRA: 4-bit NF4 base via bitsandbytes; needs lora_r > 0 and a CUDA GPU.")
    freeze_vision: bool = _f(False, "Keep the vision encoder fixed (the projector still trains).")
    freeze_projector: bool = _f(False, "Keep the vision-to-text projector fixed.")
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward: less memory, more compute.")


@dataclass
class DataConfig(_Checked):
    train: str = _f("", "Answer-only training prompts (MathV360K JSON, JSONL, MathVista, or a datasets directory).")
    val: str = _f("", "Validation split for monitoring (greedy accuracy, Pass@K).")
    test: dict[str, str] = _f({}, "Test splits, name -> file, evaluated at the start and the end.")
    seed_cot: str = _f("", "Gold chain-of-thought set for warm-up (empty: none; see warmup.hinted).")
    image_root: str = _f("", "Folder image paths resolve against (default: each data file's folder).")
    max_train: int = _f(0, "Use at most this many training prompts (0: all).", ge=0)
    max_val: int = _f(0, "Use at most this many validation prompts (0: all).", ge=0)
    unlabeled: str = _f(
        "",
        "A second prompt pool trained on with pseudo-labels (evolve.pseudo_label); answers in it are used "
        "only by the oracle mode and to measure pseudo-label accuracy ('': none).",
    )


@dataclass
class GenerationConfig(_Checked):
    backend: Backend = _f("hf", "Rollout engine: hf (transformers generate) or vllm (evostar[vllm], CUDA GPU).")
    k: int = _f(8, "Responses sampled per prompt.", ge=1)
    temperature: float = _f(
        1.0, "Sampling temperature of the K responses (the adaptive controller may change it).", gt=0
    )
    top_p: float = _f(1.0, "Nucleus sampling: keep the smallest set of tokens with this much probability.", gt=0, le=1)
    max_new_tokens: int = _f(64, "Longest response, in tokens.", ge=1)
    batch_size: int = _f(512, "Sequences per generate call (prompts x K).", ge=1)
    workers: int = _f(
        1,
        "hf backend on CPU: processes that sample K responses in parallel, one thread each, over "
        "one shared copy of the weights (1: in this process with all its threads).",
        ge=1,
    )
    rollout_dtype: RolloutDType = _f(
        "",
        "hf backend on CPU: dtype of the sampling copy of the weights ('': sample from the policy "
        "itself; bfloat16 is faster on CPUs with bf16 matrix units). Greedy evaluation always "
        "uses the policy.",
    )
    eval_batch_size: int = _f(512, "Sequences per greedy evaluation call.", ge=1)


@dataclass
class OptimConfig(_Checked):
    lr: float = _f(5e-4, "Peak learning rate (AdamW).", gt=0)
    min_lr_ratio: float = _f(0.1, "Final LR as a fraction of the peak (linear, cosine, wsd).", ge=0, le=1)
    schedule: Schedule = _f(
        "cosine",
        "LR shape over training: constant, linear, cosine, or wsd (warmup-stable-decay: constant, "
        "then linear decay to min_lr_ratio over the last decay_ratio of training).",
    )
    decay_ratio: float = _f(0.2, "wsd: share of training, at the end, over which the LR decays.", gt=0, le=1)
    warmup_ratio: float = _f(0.0, "Share of training with a linear LR warm-up.", ge=0, lt=1)
    weight_decay: float = _f(0.0, "AdamW weight decay.", ge=0)
    batch_size: int = _f(32, "Examples per optimizer step.", ge=1)
    micro_batch_size: int = _f(0, "Examples per forward pass (0: whole batch).", ge=0)
    max_grad_norm: float = _f(1.0, "Gradient clipping (0: off).", ge=0)
    autocast: Autocast = _f(
        "",
        "Mixed precision of the forward/backward: '' (off) or bf16; weights and AdamW stay in "
        "model.dtype (float32 recommended).",
        allowed="'' or bf16",
    )

    def __post_init__(self) -> None:
        if self.autocast == "fp16":
            raise refuse(
                "autocast",
                "fp16",
                "not supported: fp16 gradients need loss scaling (GradScaler), "
                "which evostar does not implement; use bf16 (CPU, NVIDIA Ampere or newer) or '' (off)",
            )
        super().__post_init__()


@dataclass
class WarmupConfig(_Checked):
    steps: int = _f(0, "Optimizer steps of warm-up SFT on the gold chains of thought (0: no warm-up).", ge=0)
    eval_every: int = _f(
        100, "Evaluate greedy validation accuracy, and checkpoint the warm-up, every this many steps.", ge=1
    )
    hinted: bool = _f(
        False,
        "With no data.seed_cot: build the warm-up set by answer-hinted generation on data.train "
        "prompts (evostar.hinted; the paper's warm-up for instruction-tuned models).",
    )
    hinted_k: int = _f(4, "Responses sampled per hinted prompt.", ge=1)
    hinted_temperature: float = _f(0.7, "Sampling temperature of the hinted responses.", gt=0)
    hinted_max_prompts: int = _f(0, "Hinted prompts drawn at random from data.train (0: all).", ge=0)
    hinted_keep_per_prompt: int = _f(1, "Correct hinted responses kept per prompt (distinct texts).", ge=1)
    optim: OptimConfig = _section(
        OptimConfig,
        "Warm-up optimizer (separate from the self-evolving one).",
        lambda: OptimConfig(lr=1e-3, schedule="cosine", min_lr_ratio=0.05),
    )


@dataclass
class EvolveConfig(_Checked):
    iterations: int = _f(4, "Self-evolving iterations (0: warm-up and evaluation only).", ge=0)
    interval: float = _f(
        0.25, "Share of the training prompts one iteration consumes (the next slice each time).", gt=0, le=1
    )
    mode: Mode = _f(
        "continuous",
        "continuous (one optimizer + schedule for the run), iterative_rft (optimizer re-created each "
        "iteration) or rest_em (restart from the initial model and re-create the optimizer).",
    )
    steps_per_iteration: int = _f(0, "Optimizer steps of SFT per iteration (0: epochs_per_iteration passes).", ge=0)
    epochs_per_iteration: float = _f(
        1.0, "Passes over the selected responses per iteration (when steps_per_iteration=0).", gt=0
    )
    selection: Selection = _f(
        "all",
        "Which correct responses of a prompt are trained on: all, random_k, top_k (by score) or "
        "threshold (score above evolve.threshold).",
    )
    select_k: int = _f(2, "Responses kept per prompt for random_k / top_k.", ge=1)
    threshold: float = _f(0.5, "Minimum score for threshold selection.", ge=0, le=1)
    dedupe: bool = _f(
        False,
        "Keep one copy of identical correct responses of a prompt (off: a response sampled often "
        "weighs more, as in the paper).",
    )
    unlabeled_from: float = _f(
        0.0,
        "With data.unlabeled: share of the iterations done before unlabeled prompts are mixed in "
        "(0: from the first; 0.75: the last quarter).",
        ge=0,
        lt=1,
    )
    pseudo_label: PseudoLabel = _f(
        "majority",
        "Answer an unlabeled prompt is trained towards: majority (most frequent final answer of its K "
        "samples), prm_weighted (answer with the largest summed PRM score) or oracle (its true answer).",
    )
    optim: OptimConfig = _section(OptimConfig, "Self-evolving optimizer.")


@dataclass
class AdaptConfig(_Checked):
    """The sampling temperature of the loop: fixed, or re-chosen every few iterations on a
    validation subset by what the next iteration's samples would be worth (M-STaR section 4)."""

    controller: Controller = _f(
        "static",
        "static (gen.temperature throughout), reward_pass (argmax Reward-Pass@k of the PRM over the grid), "
        "pass_at_k (argmax Pass@K) or balance (B-STaR's balance score).",
    )
    every: int = _f(2, "Re-choose the temperature before iteration 1, 1 + every, 1 + 2 * every, ...", ge=1)
    t_min: float = _f(0.3, "Lowest temperature of the grid.", gt=0)
    t_max: float = _f(1.6, "Highest temperature of the grid.", gt=0)
    t_step: float = _f(0.1, "Spacing of the grid.", gt=0)
    prompts: int = _f(250, "Validation prompts the candidates are sampled on (the first N; 0: all).", ge=0)
    k: int = _f(0, "Samples per prompt and candidate (0: gen.k, as in training).", ge=0)
    reward_pass_k: int = _f(2, "k of Reward-Pass@k (a correct response among the PRM's top-k).", ge=1)
    balance_n_star: int = _f(
        4, "balance: n*, the number of distinct correct selected responses that counts as enough.", ge=1
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.t_max < self.t_min:
            raise refuse("t_max", self.t_max, f"below t_min={self.t_min}")

    def grid(self) -> list[float]:
        """t_min, t_min + t_step, ... up to t_max (rounded, so 0.3 + 0.1 reads 0.4)."""
        n = int(math.floor((self.t_max - self.t_min) / self.t_step + 1e-9)) + 1
        return [round(self.t_min + i * self.t_step, 6) for i in range(n)]


@dataclass
class EvalConfig(_Checked):
    pass_k: int = _f(8, "K of Pass@K on the validation split each iteration (0: skip).", ge=0)
    pass_temperature: float | None = _f(
        1.0, "Temperature of the Pass@K samples (null: the loop's own temperature).", gt=0
    )
    pass_prompts: int = _f(
        0,
        "Validation prompts used for Pass@K (0: all; the first N otherwise); greedy accuracy is also "
        "reported on the same prompts.",
        ge=0,
    )
    trackers: str = _f(
        "",
        "Also log the per-iteration metrics through accelerate's trackers: a comma list of "
        "tensorboard, wandb ('': none). Files go to RUN/tracking.",
        check=lambda v: (
            None
            if all(t in ("tensorboard", "wandb") for t in filter(None, (x.strip() for x in v.split(","))))
            else "choose from tensorboard, wandb (comma-separated)"
        ),
        allowed="'', tensorboard, wandb, or both comma-separated",
        resume_safe=True,
    )


@dataclass
class PRMConfig(_Checked):
    """The process reward model (`evostar.reward.prm`): the run's PRM stages after warm-up
    (collect responses, Monte-Carlo step labels, training), and scoring in the loop. Off by
    default, which is also what a saved config.yaml from before this section means."""

    enabled: bool = _f(
        False,
        "Run the PRM stages after warm-up (collect -> label -> train -> eval) and score the loop's sampled "
        "training responses with the PRM where the loop reads the score: evolve.selection top_k / threshold "
        "rank by it, PRM-weighted pseudo-labels vote with it (prm.score_unused: always).",
    )
    collect_prompts: int = _f(64, "Labelled training prompts the PRM's training responses are sampled on.", ge=1)
    collect_k: int = _f(4, "Responses sampled per prompt for PRM training (and per val prompt for its metrics).", ge=1)
    collect_temperature: float = _f(1.0, "Sampling temperature of the collected responses.", gt=0)
    eval_prompts: int = _f(
        0, "Validation prompts the PRM's summary measures are computed on (0: all; the first N otherwise).", ge=0
    )
    reward_pass_k: int = _f(
        2, "k of Reward-Pass@k on the validation split each iteration (a correct response in the PRM's top-k).", ge=1
    )
    n_completions: int = _f(8, "Monte-Carlo completions sampled from each step prefix.", ge=1)
    strategy: PRMStrategy = _f(
        "binary",
        "Which step prefixes are estimated: binary (search for the first step whose prefix no longer "
        "reaches the gold answer, about log2(steps) estimates per response) or every (each prefix).",
    )
    label: PRMLabel = _f(
        "hard", "Training target of a step: hard (any completion reaches the gold answer) or soft (the share that do)."
    )
    temperature: float = _f(1.0, "Sampling temperature of the completions.", gt=0)
    top_p: float = _f(1.0, "Nucleus sampling of the completions.", gt=0, le=1)
    max_new_tokens: int = _f(64, "Longest completion, in tokens.", ge=1)
    completion_batch_size: int = _f(512, "Sequences per generate call while labelling (prefixes x completions).", ge=1)
    chunk_size: int = _f(64, "Responses per labelling chunk: the unit a killed labelling resumes from.", ge=1)
    init: str = _f(
        "policy",
        "Weights the PRM starts from: policy (the policy checkpoint whose responses it scores) or a checkpoint directory.",
        check=_not_empty("policy or a checkpoint directory"),
    )
    tag: str = _f(
        "",
        "Step tag placed after every step and after the answer block ('': the first candidate that is one "
        "token of the tokenizer; otherwise added as a special token).",
    )
    steps: int = _f(200, "Optimizer steps of PRM training.", ge=1)
    negative_weight: float = _f(
        1.0,
        "Loss weight of the negative side of a label (0: balance, the training set's positive label mass "
        "over its negative label mass).",
        ge=0,
    )
    freeze_vision: bool = _f(False, "Keep the PRM's vision encoder fixed (the projector still trains).")
    train_answer: bool = _f(True, "Also train the tag after the answer block, on the final answer's correctness.")
    aggregate: PRMAggregate = _f("min", "Response score from its step scores: min, mean, last or product.")
    score_answer: bool = _f(True, "Count the answer block's score in the response score.")
    score_batch_size: int = _f(32, "Responses per PRM forward pass when scoring.", ge=1)
    score_unused: bool = _f(
        False,
        "Score the loop's training responses even where nothing reads the score (evolve.selection all or "
        "random_k, votes not PRM-weighted), so the samples files hold PRM scores; a scoring pass per iteration.",
    )
    score_autocast: Autocast = _f(
        "",
        "Mixed precision of PRM scoring: '' (off) or bf16 (the forward pass under bf16 autocast, weights "
        "unchanged; scores move by bf16 rounding).",
        allowed="'' or bf16",
    )
    optim: OptimConfig = _section(
        OptimConfig, "PRM optimizer.", lambda: OptimConfig(lr=2e-4, batch_size=16, schedule="cosine")
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_completions > self.completion_batch_size:  # a prefix's completions share one generate call
            raise refuse(
                "n_completions",
                self.n_completions,
                f"more than completion_batch_size={self.completion_batch_size} sequences per generate call",
            )


@dataclass
class Config(_Checked):
    output_dir: str = _f(
        "runs/evolve",
        "Run directory (config, metrics, samples, checkpoints).",
        check=_not_empty("a run directory"),
        resume_safe=True,
    )
    seed: int = _f(0, "Seed of every random choice; the same seed gives the same run on CPU.", ge=0)
    threads: int = _f(0, "torch CPU threads (0: all cores).", ge=0, resume_safe=True)
    device: str = _f(
        "auto",
        "Where the policy runs: auto, cpu, cuda or cuda:N.",
        check=_device_problem,
        allowed="auto, cpu, cuda, cuda:N",
    )
    progress: bool = _f(True, "Show progress bars.", resume_safe=True)
    model: ModelConfig = _section(ModelConfig, "Policy model.")
    data: DataConfig = _section(DataConfig, "Data files.")
    gen: GenerationConfig = _section(GenerationConfig, "Rollouts.")
    warmup: WarmupConfig = _section(WarmupConfig, "Warm-up SFT.")
    evolve: EvolveConfig = _section(EvolveConfig, "The loop.")
    eval: EvalConfig = _section(EvalConfig, "Monitoring.")
    prm: PRMConfig = _section(PRMConfig, "Process reward model (off unless prm.enabled).")
    adapt: AdaptConfig = _section(AdaptConfig, "Temperature controller (static unless adapt.controller).")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_combinations(self)


def check_combinations(cfg: Config) -> None:
    """Refuse values that are each allowed but do not work together."""
    ev, gen, warm, model, prm = cfg.evolve, cfg.gen, cfg.warmup, cfg.model, cfg.prm
    if cfg.adapt.controller == "reward_pass" and not prm.enabled:
        raise refuse(
            "adapt.controller",
            "reward_pass",
            "ranks samples by the process reward model, and prm.enabled is false: set prm.enabled=true, "
            "or choose static, pass_at_k or balance",
        )
    if ev.pseudo_label == "prm_weighted" and cfg.data.unlabeled and not prm.enabled:
        raise refuse("evolve.pseudo_label", "prm_weighted", "weights votes by PRM scores, and prm.enabled is false")
    if ev.selection in SCORED_SELECTIONS and not prm.enabled:
        raise refuse(
            "evolve.selection",
            ev.selection,
            "ranks responses by their process reward model score, and prm.enabled is false: set "
            "prm.enabled=true (the PRM stages then run after warm-up), or choose all or random_k",
        )
    if prm.enabled and prm.init == "policy" and model.lora_r > 0:
        raise refuse(
            "prm.init",
            "policy",
            "with model.lora_r > 0 the policy's checkpoints hold adapters, not a whole model to start "
            "the PRM from: set prm.init to a full checkpoint directory",
        )
    ks = [("gen.k", gen.k), ("eval.pass_k", cfg.eval.pass_k), ("warmup.hinted_k", warm.hinted_k)]
    ks.append(("adapt.k", cfg.adapt.k))
    for key, k in ks + ([("prm.collect_k", prm.collect_k)] if prm.enabled else []):
        if k > gen.batch_size:  # a prompt's K samples share one generate call
            raise refuse(key, k, f"more than gen.batch_size={gen.batch_size} sequences per generate call")
    if model.quantize_4bit and model.lora_r <= 0:
        raise refuse("model.quantize_4bit", True, "QLoRA trains adapters on the 4-bit base: set model.lora_r > 0")
    if gen.backend != "hf" and (gen.workers > 1 or gen.rollout_dtype):
        raise refuse("gen.backend", gen.backend, "gen.workers and gen.rollout_dtype are options of gen.backend=hf")
    if warm.hinted and cfg.data.seed_cot:
        raise refuse(
            "warmup.hinted",
            True,
            "data.seed_cot is set too: the warm-up trains on one set, either "
            "the gold chains of thought (data.seed_cot) or the hinted one (warmup.hinted)",
        )
    if warm.hinted and warm.steps == 0:
        raise refuse("warmup.hinted", True, "warmup.steps is 0, so the hinted set would never be trained on")


# ----------------------------------------------------------------------------- dict <-> config
def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build a config dataclass from a nested dict, converting and checking every value.

    `where` is the dotted key of this section ("" at the top); errors name the full key.
    """
    prefix = f"{where}." if where else ""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of keys, got {type(data).__name__} {data!r}", where)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(str(k) for k in data if k not in names)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {[prefix + str(u) for u in unknown]}; known under {where or 'the top'}: {names}"
        )
    kwargs = {name: _coerce(hints[name], value, prefix + name) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise (err.under(where) if where else err) from None


class _Override(str):
    """A `key=value` value as typed: text keys take it as it is, other keys parse it as YAML."""

    def parsed(self) -> Any:
        if not self.strip():
            return ""
        try:
            return yaml.safe_load(self)
        except yaml.YAMLError:
            return str(self)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """`value` (from YAML or a command-line override) as type `tp`, or a ConfigError naming `key`."""
    if isinstance(value, _Override):  # text keys take it as typed, the others as a YAML scalar
        if tp is str:
            value = str(value)
        elif typing.get_origin(tp) is Literal:
            value = value.strip()
        else:
            value = value.parsed()
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    origin = typing.get_origin(tp)
    if origin is Literal:
        if isinstance(value, (bool, dict, list)):
            raise refuse(key, value, f"choose one of {list(typing.get_args(tp))}")
        return "" if value is None else str(value)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _coerce(args[0], value, key)
    if origin is list:
        if isinstance(value, str):  # `model.lora_targets=q_proj,v_proj` on the command line
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
            raise refuse(key, value, "expected a list of names")
        return [str(v) for v in value]
    if origin is dict:
        if isinstance(value, str):  # `data.test=path` on the command line
            return {Path(value).stem: value} if value else {}
        if value is None:
            return {}
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise refuse(key, value, "expected a mapping of name: path")
        return {str(k): v for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise refuse(key, value, "expected true or false")
    if tp in (int, float):
        if isinstance(value, bool):
            raise refuse(key, value, f"expected a number ({tp.__name__}), got a boolean")
        try:
            if tp is int and isinstance(value, int):
                return value
            if tp is int and isinstance(value, str) and value.lstrip("+-").isdigit():
                return int(value)  # exactly, however large (float() would round it)
            number = float(value)
            if tp is int and not number.is_integer():
                raise ValueError
            return int(number) if tp is int else number
        except (TypeError, ValueError, OverflowError):
            raise refuse(key, value, f"expected {'an integer' if tp is int else 'a number'}") from None
    if tp is str:
        if isinstance(value, (dict, list, bool)):  # YAML reads yes/no/on/off as booleans
            raise refuse(key, value, "expected text (quote it in YAML)")
        return "" if value is None else str(value)
    return value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted `key=value` overrides to a config dict: text keys take the value as typed,
    the others parse it as a YAML scalar (`gen.k=8`, `eval.pass_temperature=null`)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. evolve.iterations=6)")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for depth, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[: depth + 1])} is not a section")
        node[parts[-1]] = _Override(raw)  # parsed by the field's type (`_coerce`)
    return data


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file at `path`, then `key=value` overrides; checked."""
    data: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found" if not p.exists() else f"{p}: not a file")
        try:
            data = yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
        except yaml.MarkedYAMLError as err:
            mark = err.problem_mark
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise ConfigError(f"{p}: not valid YAML{at}: {err.problem or err}") from None
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise ConfigError(f"{p}: not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: expected a mapping of config keys at the top, got a {type(data).__name__}")
    return build_config(data, overrides, source=str(path) if path else "")


def build_config(data: dict[str, Any], overrides: list[str] | None = None, source: str = "") -> Config:
    """`Config` from defaults updated with `data` (a nested dict) and `overrides`."""
    base = to_dict(Config())
    deep_update(base, data)
    apply_overrides(base, overrides or [])
    try:
        return from_dict(Config, base)
    except ConfigError as err:
        raise (ConfigError(f"{source}: {err}", err.key) if source else err) from None


def deep_update(base: dict, new: dict) -> None:
    """Update nested dict `base` with `new`; `data.test` is replaced, not merged."""
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict) and key != "test":
            deep_update(base[key], value)
        else:
            base[key] = value


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# ----------------------------------------------------------------------------- introspection
@dataclass
class FieldInfo:
    key: str
    default: Any
    help: str
    allowed: str
    choices: tuple[Any, ...] | None
    bounds: dict[str, float]
    resume_safe: bool


def describe(cls: type = Config, prefix: str = "") -> list[FieldInfo]:
    """Every key with its default, help and allowed values (`evostar config --fields`)."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            rows += describe(type(default), key + ".")
            continue
        choices = _choices(hints[f.name])
        bounds = {b: f.metadata[b] for b in ("ge", "gt", "le", "lt") if f.metadata.get(b) is not None}
        allowed = f.metadata.get("allowed") or (" | ".join(repr(c) for c in choices) if choices else "")
        rows.append(
            FieldInfo(key, default, f.metadata["help"], allowed, choices, bounds, f.metadata.get("resume_safe", False))
        )
    return rows


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and key != "test":
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def resume_conflicts(saved: Config, current: Config) -> list[str]:
    """`key: saved -> current` for every key that differs and may change a run's results."""
    safe = {row.key for row in describe() if row.resume_safe}
    old, new = flatten(to_dict(saved)), flatten(to_dict(current))
    return [f"{k}: {old[k]!r} -> {new[k]!r}" for k in new if k not in safe and old.get(k) != new[k]]
