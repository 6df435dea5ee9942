"""Load and save any Hugging Face vision-language model with its processor.

Everything goes through `AutoProcessor` and `AutoModelForImageTextToText`, so a Qwen2-VL, LLaVA,
Idefics3 ... checkpoint directory loads the same way. Checkpoints that ship their own modelling
code (config.json `auto_map`: InternVL2, Phi-3.5-V, MiniCPM-V) load only with
`trust_remote_code=True`, passed only when the user asks for it; custom code that registers
`AutoModelForCausalLM` but not `AutoModelForImageTextToText` (Phi-3.5-V does) loads through the
former. The loop then needs what any family needs: a multimodal processor (a `ProcessorMixin`
with a chat template) whose outputs the model's `forward` and `generate` take as they are.
InternVL2 ships no processor, and MiniCPM-Llama3-V-2.5's forward takes a `data` dict: those two
do not meet it (InternVL's native `-hf` format does, see `evostar.models.families`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    PretrainedConfig,
    ProcessorMixin,
)
from transformers.models.internvl import InternVLConfig, InternVLProcessor
from transformers.models.qwen2_vl import Qwen2VLConfig, Qwen2VLProcessor

from evostar.errors import UserError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class ModelLoadError(UserError):
    """A model directory that cannot be loaded, with the reason in words."""


def _load_error(path: str | os.PathLike, what: str, err: Exception) -> ModelLoadError:
    if "trust_remote_code" in str(err):
        return ModelLoadError(
            f"{path}: the checkpoint ships its own modelling code (auto_map in its config.json), "
            f"which evostar runs only when allowed: set model.trust_remote_code=true (evostar eval: "
            f"--trust-remote-code) if you trust the code in {Path(path).resolve()}"
        )
    text = " ".join(str(err).split())
    if "ignore_mismatched_sizes" in text or "size mismatch" in text:
        text = "weights of another shape than config.json describes (is the config from another model?)"
    message = (text[:300] + " ...") if len(text) > 300 else (text or type(err).__name__)
    return ModelLoadError(f"{path}: cannot load the {what} ({type(err).__name__}): {message}")


def transformers_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside DDP / DeepSpeed (`.module`) and peft (`.get_base_model()`)."""
    while hasattr(model, "module"):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@functools.cache
def _forward_parameters(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.forward).parameters)


def forward_accepts(model: torch.nn.Module, name: str) -> bool:
    """The transformers model's `forward` takes the keyword `name` (read once per class)."""
    return name in _forward_parameters(type(transformers_model(model)))


def auto_model_class(config: PretrainedConfig, trust_remote_code: bool = False) -> type:
    """`AutoModelForImageTextToText`, or `AutoModelForCausalLM` for custom code that registers
    only the latter (Phi-3.5-Vision's `Phi3VForCausalLM` takes pixel values all the same)."""
    auto_map = getattr(config, "auto_map", None) or {}
    if trust_remote_code and "AutoModelForImageTextToText" not in auto_map and "AutoModelForCausalLM" in auto_map:
        return AutoModelForCausalLM
    return AutoModelForImageTextToText


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """Qwen2-VL processor without the video processor.

    transformers' video processors import torchvision, which does not import beside the CPU torch
    wheel; building the stock processor then fails. Images are all the recipe needs.
    """

    # The sub-processors a ProcessorMixin expects are read off this signature: no video here.
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        kwargs.pop("video_processor", None)
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    def _get_num_multimodal_tokens(self, image_sizes=None, video_sizes=None, **kwargs):
        return super()._get_num_multimodal_tokens(image_sizes=image_sizes, **kwargs)


class ImageOnlyInternVLProcessor(InternVLProcessor):
    """InternVL (the native InternVL3-hf format) processor without the video processor, for the
    same reason as `ImageOnlyQwen2VLProcessor`. The tokenizer still names a `video_token`, which
    `InternVLProcessor` reads; only video inputs are unsupported."""

    def __init__(self, image_processor=None, tokenizer=None, image_seq_length: int = 256, chat_template=None, **kwargs):
        kwargs.pop("video_processor", None)
        super().__init__(
            image_processor, tokenizer, None, image_seq_length=image_seq_length, chat_template=chat_template, **kwargs
        )


def _torchvision_available() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:
        return False
    return True


_REGISTERED = False


def register_image_only_processors() -> None:
    """Route Qwen2-VL and InternVL configs to image-only processors when torchvision is unusable."""
    global _REGISTERED
    if _REGISTERED or _torchvision_available():
        return
    from transformers.models.qwen2_5_vl import Qwen2_5_VLConfig

    for config_class in (Qwen2VLConfig, Qwen2_5_VLConfig):
        AutoProcessor.register(config_class, ImageOnlyQwen2VLProcessor, exist_ok=True)
    AutoProcessor.register(InternVLConfig, ImageOnlyInternVLProcessor, exist_ok=True)
    _REGISTERED = True


@contextlib.contextmanager
def full_weights() -> Iterator[None]:
    """Build models with whole weights even under DeepSpeed ZeRO-3.

    accelerate registers its DeepSpeed config with transformers, which then builds every model
    inside `deepspeed.zero.Init`, each rank keeping only a partition (a collective, too). The
    loop samples, evaluates and saves with whole weights, and its trainer partitions a copy.
    """
    # Only accelerate's DeepSpeed set-up imports this module and registers a config; importing it
    # here would import deepspeed, which prints an accelerator warning on stdout.
    hf_deepspeed = sys.modules.get("transformers.integrations.deepspeed")
    ref = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    config = ref() if ref is not None else None
    if config is None:
        yield
        return
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(config)


def load_processor(path: str | os.PathLike, trust_remote_code: bool = False) -> ProcessorMixin:
    register_image_only_processors()
    _check_model_dir(path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        # exactly Qwen2-VL: a custom-code subclass brings its own processor (AutoProcessor below)
        if type(config) is Qwen2VLConfig and not _torchvision_available():
            processor = ImageOnlyQwen2VLProcessor.from_pretrained(path)
        else:
            processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as err:  # transformers raises many types for bad files
        raise _load_error(path, "processor", err) from err
    if not isinstance(processor, ProcessorMixin):
        # AutoProcessor silently falls back to a bare tokenizer when no processor matches.
        raise ModelLoadError(f"{path}: AutoProcessor returned {type(processor).__name__}, not a multimodal processor")
    try:  # every prompt is rendered by the chat template
        processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "x"}]}], tokenize=False)
    except Exception as err:
        raise ModelLoadError(
            f"{path}: the processor cannot render a chat (is chat_template.jinja, or chat_template in its "
            f"processor or tokenizer config, missing?): {err}"
        ) from None
    tokenizer = getattr(processor, "tokenizer", None)
    # Without its files transformers builds an empty tokenizer silently (it encodes text to nothing).
    if tokenizer is None or len(tokenizer) <= 1 or not tokenizer("0 1 2", add_special_tokens=False)["input_ids"]:
        files = ", ".join(TOKENIZER_FILES)
        raise ModelLoadError(f"{path}: the processor has no working tokenizer: are its files missing ({files})?")
    return processor


def context_length(path: str | os.PathLike, trust_remote_code: bool = False) -> int | None:
    """The text model's context in tokens (`max_position_embeddings`), where the config says."""
    _check_model_dir(path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as err:
        raise _load_error(path, "config", err) from err
    text_config = getattr(config, "text_config", None) or config
    n = getattr(text_config, "max_position_embeddings", None)
    return n if isinstance(n, int) else None


def load_model(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | str = torch.float32,
    trust_remote_code: bool = False,
    device: str | torch.device = "cpu",
    **kwargs: Any,
) -> torch.nn.Module:
    """Load a vision-language model for training/generation (safetensors weights only)."""
    _check_model_dir(path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        with full_weights():
            model, info = auto_model_class(config, trust_remote_code).from_pretrained(
                path,
                config=config,
                dtype=dtype,
                trust_remote_code=trust_remote_code,
                use_safetensors=True,
                output_loading_info=True,
                **kwargs,
            )
    except Exception as err:  # safetensors, transformers and torch raise many types for bad files
        raise _load_error(path, "model", err) from err
    # transformers initialises missing or mis-shaped weights at random and only logs it
    for kind in ("missing_keys", "mismatched_keys"):
        keys = sorted(map(str, info.get(kind) or ()))
        if keys:
            shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
            what = "has no weights for" if kind == "missing_keys" else "has weights of the wrong shape for"
            raise ModelLoadError(f"{path}: the checkpoint {what} {shown}: is it from another architecture or damaged?")
    if getattr(model, "hf_device_map", None) is not None:
        return model  # placed by a `device_map` (e.g. a 4-bit QLoRA base): `.to` would undo it
    if torch.device(device).type == "cpu":
        from evostar.models.attention import use_cpu_attention

        use_cpu_attention(model)
    return model.to(device)


def load_model_and_processor(
    path: str | os.PathLike, *, trust_remote_code: bool = False, **kwargs: Any
) -> tuple[torch.nn.Module, ProcessorMixin]:
    return load_model(path, trust_remote_code=trust_remote_code, **kwargs), load_processor(
        path, trust_remote_code=trust_remote_code
    )


def save_model_and_processor(model: torch.nn.Module, processor: ProcessorMixin, path: str | os.PathLike) -> None:
    """Save as an ordinary HF checkpoint directory (safetensors) that `from_pretrained` reloads.

    A LoRA model is saved merged (rollouts and vLLM read plain weights), with its adapters in
    `path/adapter` for an exact resume (`evostar.models.lora.load_adapters`).
    """
    from evostar.models.lora import has_adapters, merge_adapters, save_adapters

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    unwrapped = getattr(model, "module", model)
    if has_adapters(unwrapped):
        save_adapters(unwrapped, path / "adapter")
        unwrapped = merge_adapters(unwrapped, copy_model=True)
    unwrapped.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)


def _check_model_dir(path: str | os.PathLike) -> None:
    p = Path(path)
    if p.exists() and not (p / "config.json").exists():
        raise ModelLoadError(f"{p}: not a model directory (no config.json)")
    if not p.exists() and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ModelLoadError(f"{p}: no such model directory (and HF_HUB_OFFLINE=1)")


def load_policy(model_cfg: Any, checkpoint: str | os.PathLike | None = None, device: Any = "cpu") -> torch.nn.Module:
    """The model to train, with every `ModelConfig` switch applied (LoRA, freezing, ...).

    `checkpoint` is a run's checkpoint directory (None: `model_cfg.path`). With LoRA the frozen
    base is always `model_cfg.path` and the checkpoint's saved adapters go back on it, so a
    resumed run continues from exactly the weights its AdamW state belongs to.
    """
    from evostar.models.lora import load_adapters, prepare_for_training, quantization_kwargs

    dtype = getattr(torch, model_cfg.dtype)
    trust = model_cfg.trust_remote_code
    if model_cfg.lora_r > 0:
        base = load_model(
            model_cfg.path, dtype=dtype, trust_remote_code=trust, device=device, **quantization_kwargs(model_cfg)
        )
        adapter = Path(checkpoint) / "adapter" if checkpoint is not None else None
        if adapter is not None and adapter.exists():
            return load_adapters(base, adapter).to(device)
        return prepare_for_training(base, model_cfg)
    model = load_model(checkpoint or model_cfg.path, dtype=dtype, trust_remote_code=trust, device=device)
    return prepare_for_training(model, model_cfg)
