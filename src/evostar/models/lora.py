"""LoRA / QLoRA and partial freezing for any HF vision-language model.

Full fine-tuning is what the CPU gym does; a 7B policy on one GPU needs less: adapters on the
language model (`apply_adapters`), optionally over a 4-bit base (QLoRA, CUDA only), a frozen
vision tower or projector, and gradient checkpointing. Rollouts (HF or vLLM) and checkpoints
want ordinary weights, so `merge_adapters` folds the adapters back into a plain model.

The parts of a VLM are found by the attribute names transformers uses across families
(Qwen2-VL `visual`/`merger`, LLaVA `vision_tower`/`multi_modal_projector`, Idefics3
`vision_model`/`connector`, ...), so nothing here is family-specific.

    prepare_for_training(model, cfg)   # cfg: ModelConfig (or `AdapterConfig`)
    ...train...
    plain = merge_adapters(model)      # ordinary PreTrainedModel for save_pretrained / vLLM
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from evostar.config import ConfigError

# Last attribute name of the vision encoder, the vision-to-text projector and the language model
# in transformers' VLMs (and the common remote-code ones: InternVL `mlp1`, MiniCPM-V `vpm`).
VISION_NAMES = ("visual", "vision_tower", "vision_model", "vision_encoder", "vpm", "image_encoder")
PROJECTOR_NAMES = ("multi_modal_projector", "connector", "merger", "mm_projector", "resampler", "mlp1")
LANGUAGE_NAMES = ("language_model", "text_model", "llm")
# Bare parameters of the vision-to-text interface (LLaVA-NeXT's learned row separator).
PROJECTOR_PARAM_NAMES = ("image_newline",)


class QLoRAUnavailableError(RuntimeError):
    """4-bit quantization was asked for where it cannot run (no CUDA GPU, no bitsandbytes)."""


@dataclass
class AdapterConfig:
    """The adapter/freezing switches; `evostar.config.ModelConfig` carries the same fields."""

    lora_r: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: ["all-linear"])
    lora_train_projector: bool = False
    quantize_4bit: bool = False
    freeze_vision: bool = False
    freeze_projector: bool = False
    gradient_checkpointing: bool = False


# -- finding the parts ----------------------------------------------------------------------
def _outermost(model: torch.nn.Module, names: Sequence[str]) -> list[tuple[str, torch.nn.Module]]:
    """Modules whose attribute name is in `names`, not nested in an earlier match."""
    found: list[tuple[str, torch.nn.Module]] = []
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in names and not any(name.startswith(p + ".") for p, _ in found):
            found.append((name, module))
    return found


def language_model(model: torch.nn.Module) -> tuple[str, torch.nn.Module]:
    """(qualified name, module) of the text decoder."""
    found = _outermost(model, LANGUAGE_NAMES)
    if found:
        return found[0]
    raise ConfigError(
        f"{type(model).__name__}: no language model found (looked for attributes {LANGUAGE_NAMES}): "
        "LoRA and freezing need one"
    )


def vision_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return _outermost(model, VISION_NAMES)


def projector_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Projectors outside the language model (Qwen2-VL's `merger` sits inside `visual`)."""
    lm_name = _safe_lm_name(model)
    return [(n, m) for n, m in _outermost(model, PROJECTOR_NAMES) if lm_name is None or not n.startswith(lm_name + ".")]


def _safe_lm_name(model: torch.nn.Module) -> str | None:
    found = _outermost(model, LANGUAGE_NAMES)
    return found[0][0] if found else None


def _params_under(model: torch.nn.Module, prefixes: Sequence[str]) -> Iterator[tuple[str, torch.nn.Parameter]]:
    for name, p in model.named_parameters():
        if any(name.startswith(pre + ".") for pre in prefixes):
            yield name, p


# -- freezing -------------------------------------------------------------------------------
def freeze_vision(model: torch.nn.Module) -> int:
    """Freeze the vision encoder (not a projector living inside it); returns tensors frozen.

    A frozen encoder keeps the pretrained visual features and saves its optimizer state.
    """
    towers = [n for n, _ in vision_modules(model)]
    if not towers:
        raise ConfigError(
            f"model.freeze_vision: {type(model).__name__} has no vision tower (looked for {VISION_NAMES})"
        )
    projectors = [n for n, _ in projector_modules(model)]
    frozen = 0
    for name, p in _params_under(model, towers):
        if not any(name.startswith(pre + ".") for pre in projectors):
            p.requires_grad_(False)
            frozen += 1
    return frozen


def freeze_projector(model: torch.nn.Module) -> int:
    """Freeze the vision-to-text projector; returns how many tensors were frozen."""
    projectors = [n for n, _ in projector_modules(model)]
    if not projectors:
        raise ConfigError(
            f"model.freeze_projector: {type(model).__name__} has no projector (looked for {PROJECTOR_NAMES})"
        )
    frozen = 0
    for name, p in model.named_parameters():
        under = any(name.startswith(pre + ".") for pre in projectors)
        if under or name.rsplit(".", 1)[-1] in PROJECTOR_PARAM_NAMES:
            p.requires_grad_(False)
            frozen += 1
    return frozen


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute activations in the backward pass: less memory for more compute.

    Non-reentrant checkpointing also works when the inputs of a block need no gradient (frozen
    embeddings under LoRA), which the reentrant variant silently gets wrong.
    """
    base = model.get_base_model() if has_adapters(model) else model
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x name
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


# -- adapters -------------------------------------------------------------------------------
def lora_target_regex(model: torch.nn.Module, targets: Sequence[str] = ("all-linear",)) -> str:
    """A peft `target_modules` regex: the language model's linear layers, by attribute name.

    peft's own `"all-linear"` would also wrap the vision tower and projector; anchoring on the
    language model's prefix keeps them out.
    """
    lm_name, lm = language_model(model)
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in lm.named_modules() if isinstance(m, torch.nn.Linear) and n})
    wanted = linear if "all-linear" in targets else [t for t in linear if t in targets]
    missing = [t for t in targets if t != "all-linear" and t not in linear]
    if missing or not wanted:
        raise ConfigError(f"model.lora_targets={list(targets)}: the language model's linear layers are {linear}")
    return rf"{re.escape(lm_name)}\..*\.({'|'.join(map(re.escape, wanted))})"


def check_4bit_possible() -> None:
    """Raise `QLoRAUnavailableError` unless this machine can run bitsandbytes' 4-bit kernels."""
    if not torch.cuda.is_available():
        raise QLoRAUnavailableError(
            "QLoRA (model.quantize_4bit=true) needs a CUDA GPU: bitsandbytes 4-bit kernels do not "
            "run on CPU. Use plain LoRA (quantize_4bit=false) or full fine-tuning here."
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise QLoRAUnavailableError("QLoRA needs bitsandbytes: pip install bitsandbytes") from err


def quantization_kwargs(cfg: Any, compute_dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    """`from_pretrained` kwargs for a 4-bit NF4 base (empty unless `cfg.quantize_4bit`).

    Pass them to `evostar.models.hub.load_model(path, **quantization_kwargs(cfg))`; raises
    `QLoRAUnavailableError` on a machine without CUDA.
    """
    if not getattr(cfg, "quantize_4bit", False):
        return {}
    check_4bit_possible()
    from transformers import BitsAndBytesConfig

    return {
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
            # Keep the vision tower and projector in full precision: small, and sensitive.
            llm_int8_skip_modules=[*VISION_NAMES, *PROJECTOR_NAMES, "lm_head"],
        ),
        "device_map": {"": 0},
    }


def is_quantized(model: torch.nn.Module) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def apply_adapters(model: torch.nn.Module, cfg: Any) -> torch.nn.Module:
    """Wrap `model` in LoRA adapters on its language model; only the adapters stay trainable
    (and the projector, with `lora_train_projector`: LLaVA's LoRA recipe).

    `cfg` needs `lora_r`, `lora_alpha`, `lora_dropout`, `lora_targets` (and optionally
    `lora_train_projector`, `quantize_4bit`, `gradient_checkpointing`). A 4-bit base (QLoRA)
    must already be loaded quantized (see `quantization_kwargs`).
    """
    if getattr(cfg, "quantize_4bit", False):
        check_4bit_possible()
        if not is_quantized(model):
            raise ValueError("quantize_4bit: load the model with quantization_kwargs(cfg) first")
    if cfg.lora_r <= 0:
        raise ValueError(f"lora_r must be positive to add adapters, got {cfg.lora_r}")
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    targets = getattr(cfg, "lora_targets", None) or ["all-linear"]
    if isinstance(targets, str):  # `model.lora_targets=q_proj,v_proj` on the command line
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    # A fully trained projector is a peft `modules_to_save` copy: it is then saved with the
    # adapters (exact resume) and folded back by `merge_adapters`.
    to_save = [n for n, _ in projector_modules(model)] if getattr(cfg, "lora_train_projector", False) else None
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=lora_target_regex(model, targets),
        modules_to_save=to_save,
        bias="none",
    )
    if is_quantized(model):
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=bool(getattr(cfg, "gradient_checkpointing", False)),
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    # The same adapter init on every rank whatever random numbers ran before: FSDP and
    # DeepSpeed shard each rank's own copy (DDP would broadcast rank 0's), and the global RNG
    # stream of the caller is left as it was.
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        return get_peft_model(model, lora)


def prepare_for_training(model: torch.nn.Module, cfg: Any) -> torch.nn.Module:
    """Apply every switch of `cfg` in the right order; returns the model to train.

    LoRA (`lora_r > 0`) freezes the whole base (see `apply_adapters`). Without LoRA,
    `freeze_vision` / `freeze_projector` pick what full fine-tuning leaves fixed.
    """
    if getattr(cfg, "lora_r", 0) > 0:
        model = apply_adapters(model, cfg)
    else:
        if getattr(cfg, "quantize_4bit", False):
            raise ValueError("quantize_4bit needs LoRA (lora_r > 0): a 4-bit base cannot be trained")
        if getattr(cfg, "freeze_vision", False):
            freeze_vision(model)
        if getattr(cfg, "freeze_projector", False):
            freeze_projector(model)
    if getattr(cfg, "gradient_checkpointing", False):
        enable_gradient_checkpointing(model)
    return model


def has_adapters(model: torch.nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(getattr(model, "module", model), PeftModel)


def merge_adapters(model: torch.nn.Module, *, copy_model: bool = False) -> torch.nn.Module:
    """Fold LoRA adapters into the base weights and return the plain transformers model.

    `copy_model=True` merges a deep copy, leaving the adapter model (and its optimizer's
    parameters) untouched, for checkpoints in the middle of training. A 4-bit base is
    dequantized after merging, so the result is an ordinary full-precision checkpoint.
    A model without adapters is returned as it is.
    """
    model = getattr(model, "module", model)
    if not has_adapters(model):
        return model
    if copy_model:
        model = copy.deepcopy(model)
    quantized = is_quantized(model)
    merged = model.merge_and_unload()
    if quantized:
        merged = merged.dequantize()
    return merged


def save_adapters(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Save only the adapters (and a trained projector copy): with the frozen base they
    rebuild the adapter model exactly, which the merged weights alone cannot."""
    getattr(model, "module", model).save_pretrained(path, safe_serialization=True)


def load_adapters(base: torch.nn.Module, path: str | os.PathLike) -> torch.nn.Module:
    """Put saved adapters back on the base they were trained on, trainable (for resume)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base, path, is_trainable=True)


def trainable_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Counts for logs: how much of the model the optimizer sees."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}
