"""Tiny random-init checkpoints of several native transformers VLM families.

The recipe is architecture-agnostic (everything goes through `AutoProcessor` and
`AutoModelForImageTextToText`); these builders prove it on CPU by making ~1M-parameter models of
each family with the family's own image tokens, chat template style and processor, so the gym
runs, saves and reloads them exactly like a hub checkpoint. Each uses the locally trained
byte-level tokenizer of `evostar.models.tiny` (digits one per token).

    build_tiny("llava", texts, "models/llava-tiny")  # -> Path of an HF checkpoint directory

Image handling per family, for the gym's 84x28 strips at the defaults (patch 7, 28-pixel tiles):
- qwen2_vl / qwen2_5_vl: native aspect ratio, 2x2-merged patches: 12 image tokens.
- llava: CLIP is square-only, so the processor stretches the strip to 28x28: 16 tokens.
- llava_next: "anyres" tiling keeps the aspect ratio: 3 tiles + a global view, 68 tokens.
- idefics3: 3 tiles of 28x28 + a global view, each pixel-shuffled to 4 tokens, with Idefics3's
  `<fake_token_around_image>` / `<row_1_col_j>` / `<global-img>` wrappers: 26 tokens.
- internvl: InternVL's dynamic tiling, 3 tiles of 28x28 + a thumbnail, each pixel-shuffled to 4
  `<IMG_CONTEXT>` tokens, between `<img>` and `</img>`: 18 tokens.
Only the Qwen families take no stretched or tiled detour, and they also cost the fewest tokens.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    CLIPVisionConfig,
    GotOcr2ImageProcessorPil,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    InternVLConfig,
    InternVLForConditionalGeneration,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaImageProcessorPil,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
)

from evostar.models.hub import ImageOnlyInternVLProcessor, save_model_and_processor
from evostar.models.tiny import (
    TinyModelSpec,
    build_tiny_qwen2_vl,
    qwen_text_config,
    qwen_vision_token_ids,
    save_tiny_qwen,
    train_tokenizer,
)

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "llava", "llava_next", "idefics3", "internvl")

# LLaVA-1.5 (Vicuna) turn style, plus an explicit `</s>` after the assistant turn: without an
# end-of-turn token the model could never learn to stop.
LLAVA_SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<image>"]
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{{ part['text'] }}{% endfor %}{% endif %}"
    "{{ '\\n' }}"
    "{% else %}{{ message['role'] | upper }}: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}</s>{% endif %}{{ '\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT: {% endif %}"
)

# Idefics3's own template (`User:<image>question<end_of_utterance>\nAssistant:`).
IDEFICS3_ROW_COL_TOKENS = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
IDEFICS3_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<end_of_utterance>",
    "<fake_token_around_image>",
    "<image>",
    "<global-img>",
    *IDEFICS3_ROW_COL_TOKENS,
]
IDEFICS3_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}: {{ message['content'] }}"
    "{% else %}{% if message['content'][0]['type'] == 'image' %}:{% else %}: {% endif %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

# InternVL3-hf: Qwen2.5 tokens and turns; the template writes one `<IMG_CONTEXT>` per image, which
# the processor expands to `<img>` + image_seq_length x tiles `<IMG_CONTEXT>` + `</img>`.
INTERNVL_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
# The tokenizer attributes `InternVLProcessor` reads (saved in tokenizer_config.json).
INTERNVL_EXTRA_SPECIAL_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
# transformers' own InternVL3-hf template (convert_internvl_weights_to_hf.py).
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{'<|im_end|>\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass
class FamilySpec:
    """Sizes shared by the non-Qwen2-VL builders; the defaults give ~1M parameters."""

    vocab_size: int = 512
    hidden_size: int = 128
    intermediate_size: int = 512
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    vision_depth: int = 2
    vision_width: int = 64
    vision_heads: int = 4
    patch_size: int = 7
    image_size: int = 28
    """LLaVA: side of the square CLIP input. Idefics3, InternVL: side of one tile."""
    max_position_embeddings: int = 1024


def _texts_with(texts: Iterable[str], *extra: str, repeat: int = 50) -> list[str]:
    """The corpus plus the template's role words, so BPE learns them as a few tokens each."""
    return [*texts, *[e for e in extra for _ in range(repeat)]]


def _llama_text_config(spec: FamilySpec, vocab: int, eos: int, pad: int) -> dict:
    return dict(
        model_type="llama",
        vocab_size=vocab,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=None,
        eos_token_id=eos,
        pad_token_id=pad,
        tie_word_embeddings=True,
    )


def _vit_config(spec: FamilySpec) -> dict:
    """The plain ViT sizes LLaVA's CLIP, Idefics3's SigLIP and InternVL's InternViT configs share."""
    return dict(
        hidden_size=spec.vision_width,
        intermediate_size=spec.vision_width * 2,
        num_hidden_layers=spec.vision_depth,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
    )


def _save(model: torch.nn.Module, processor: ProcessorMixin, out_dir: str | os.PathLike) -> Path:
    out = Path(out_dir)
    save_model_and_processor(model, processor, out)
    return out


def _finish(model: torch.nn.Module, eos: int, pad: int) -> None:
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = pad
    model.generation_config.bos_token_id = None


def build_tiny_qwen2_5_vl(
    texts: Iterable[str], out_dir: str | os.PathLike, spec: FamilySpec | None = None, seed: int = 0
) -> Path:
    """Qwen2.5-VL: Qwen2-VL's tokens and template, window-attention ViT with a SwiGLU MLP."""
    spec = spec or FamilySpec()
    tokenizer = train_tokenizer(texts, spec.vocab_size)
    config = Qwen2_5_VLConfig(
        text_config=qwen_text_config(spec, tokenizer),
        vision_config=dict(
            depth=spec.vision_depth,
            hidden_size=spec.vision_width,
            intermediate_size=spec.vision_width * 2,
            num_heads=spec.vision_heads,
            out_hidden_size=spec.hidden_size,
            patch_size=spec.patch_size,
            spatial_merge_size=2,
            temporal_patch_size=2,
            # Windows of 4x4 merged patches; the last block attends over the whole image.
            window_size=spec.patch_size * 2 * 4,
            fullatt_block_indexes=[spec.vision_depth - 1],
        ),
        **qwen_vision_token_ids(tokenizer),
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    return save_tiny_qwen(model, tokenizer, spec.patch_size, out_dir)


def _llava_tokenizer(texts: Iterable[str], spec: FamilySpec) -> PreTrainedTokenizerFast:
    return train_tokenizer(
        _texts_with(texts, "USER: ", "ASSISTANT: "),
        spec.vocab_size,
        special_tokens=LLAVA_SPECIAL_TOKENS,
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        chat_template=LLAVA_CHAT_TEMPLATE,
    )


def _llava_config_kwargs(spec: FamilySpec, tokenizer: PreTrainedTokenizerFast) -> dict:
    """What LLaVA and LLaVA-NeXT configs share: CLIP ViT, Llama, `<image>` token."""
    eos, pad = tokenizer.convert_tokens_to_ids("</s>"), tokenizer.convert_tokens_to_ids("<pad>")
    return dict(
        vision_config=CLIPVisionConfig(**_vit_config(spec), projection_dim=spec.vision_width).to_dict(),
        text_config=_llama_text_config(spec, len(tokenizer), eos, pad),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(spec.image_size // spec.patch_size) ** 2,
        # The last layer's patch features (LLaVA-1.5 takes the second-to-last of a deep CLIP;
        # with two layers that would leave one unused). "default" drops the CLS feature.
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=True,
    )


def _llava_processor_kwargs(spec: FamilySpec, tokenizer: PreTrainedTokenizerFast) -> dict:
    return dict(
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLS, dropped again by the "default" strategy
        chat_template=LLAVA_CHAT_TEMPLATE,
    )


def build_tiny_llava(
    texts: Iterable[str], out_dir: str | os.PathLike, spec: FamilySpec | None = None, seed: int = 0
) -> Path:
    """LLaVA-1.5: CLIP ViT + 2-layer MLP projector + Llama, `<image>` expanded per patch.

    CLIP is square-only: the processor stretches every image to `image_size` square (no center
    crop, which would cut a strip down to its middle).
    """
    spec = spec or FamilySpec()
    tokenizer = _llava_tokenizer(texts, spec)
    config = LlavaConfig(**_llava_config_kwargs(spec, tokenizer))
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    _finish(model, config.text_config.eos_token_id, config.text_config.pad_token_id)
    side = {"height": spec.image_size, "width": spec.image_size}
    image_processor = LlavaImageProcessorPil(size=side, crop_size=side, do_center_crop=False, do_pad=False)
    processor = LlavaProcessor(image_processor=image_processor, **_llava_processor_kwargs(spec, tokenizer))
    return _save(model, processor, out_dir)


def build_tiny_llava_next(
    texts: Iterable[str], out_dir: str | os.PathLike, spec: FamilySpec | None = None, seed: int = 0
) -> Path:
    """LLaVA-NeXT ("anyres"): the image is tiled on the best-fitting grid of `image_size`
    squares plus a stretched global view, so strips keep their aspect ratio (an 84x28 strip:
    3 tiles + 1 global = 64 patch tokens, plus one newline token per tile row)."""
    spec = spec or FamilySpec()
    tokenizer = _llava_tokenizer(texts, spec)
    s = spec.image_size
    pinpoints = [[s, s], [s, 2 * s], [2 * s, s], [s, 3 * s], [3 * s, s], [2 * s, 2 * s]]
    config = LlavaNextConfig(**_llava_config_kwargs(spec, tokenizer), image_grid_pinpoints=pinpoints)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config)
    _finish(model, config.text_config.eos_token_id, config.text_config.pad_token_id)
    side = {"height": s, "width": s}
    image_processor = LlavaNextImageProcessorPil(
        size=side, crop_size=side, do_center_crop=False, image_grid_pinpoints=pinpoints
    )
    processor = LlavaNextProcessor(image_processor=image_processor, **_llava_processor_kwargs(spec, tokenizer))
    return _save(model, processor, out_dir)


def build_tiny_idefics3(
    texts: Iterable[str], out_dir: str | os.PathLike, spec: FamilySpec | None = None, seed: int = 0
) -> Path:
    """Idefics3: SigLIP-style ViT on image tiles + pixel-shuffle connector + Llama."""
    spec = spec or FamilySpec()
    tokenizer = train_tokenizer(
        _texts_with(texts, "User:", "Assistant:"),
        spec.vocab_size,
        special_tokens=IDEFICS3_SPECIAL_TOKENS,
        eos_token="<end_of_utterance>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<image>"},
        chat_template=IDEFICS3_CHAT_TEMPLATE,
    )
    eos = tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    scale = 2
    image_seq_len = (spec.image_size // spec.patch_size) ** 2 // scale**2
    config = Idefics3Config(
        vision_config=_vit_config(spec),
        text_config=_llama_text_config(spec, len(tokenizer), eos, pad),
        image_token_id=image_token,
        scale_factor=scale,
        pad_token_id=pad,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config)
    _finish(model, eos, pad)
    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=True,
        size={"longest_edge": 3 * spec.image_size},
        max_image_size={"longest_edge": spec.image_size},
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=image_seq_len,
        chat_template=IDEFICS3_CHAT_TEMPLATE,
    )
    return _save(model, processor, out_dir)


def build_tiny_internvl(
    texts: Iterable[str], out_dir: str | os.PathLike, spec: FamilySpec | None = None, seed: int = 0
) -> Path:
    """InternVL3 (native `internvl`): InternViT on image tiles + pixel shuffle + MLP + Qwen2.

    The vision tower only takes square tiles of `image_size`. InternVL's dynamic tiling picks the
    grid of up to `max_patches` tiles closest to the image's aspect ratio and adds a squashed
    thumbnail, so an 84x28 strip is cut into its three 28x28 digit cells at native resolution
    (a single 28x28 resize would squeeze three digits into one cell). Each tile is 4x4 patches,
    pixel-shuffled (downsample 0.5) to 4 tokens.
    """
    spec = spec or FamilySpec()
    tokenizer = train_tokenizer(
        _texts_with(texts, "user\n", "assistant\n"),
        spec.vocab_size,
        special_tokens=INTERNVL_SPECIAL_TOKENS,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=INTERNVL_EXTRA_SPECIAL_TOKENS,
        chat_template=INTERNVL_CHAT_TEMPLATE,
    )
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    downsample = 0.5
    image_seq_length = int((spec.image_size // spec.patch_size) ** 2 * downsample**2)
    config = InternVLConfig(
        vision_config=_vit_config(spec),
        text_config={**_llama_text_config(spec, len(tokenizer), eos, pad), "model_type": "qwen2"},
        image_token_id=tokenizer.context_image_token_id,
        image_seq_length=image_seq_length,
        downsample_ratio=downsample,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",  # drop the CLS feature
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config)
    _finish(model, eos, pad)
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": spec.image_size, "width": spec.image_size}, crop_to_patches=True, min_patches=1, max_patches=6
    )
    processor = ImageOnlyInternVLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_length=image_seq_length,
        chat_template=INTERNVL_CHAT_TEMPLATE,
    )
    return _save(model, processor, out_dir)


def _qwen2_vl(texts: Iterable[str], out_dir: str | os.PathLike, seed: int = 0) -> Path:
    return build_tiny_qwen2_vl(texts, out_dir, TinyModelSpec(), seed=seed)


BUILDERS: dict[str, Callable[..., Path]] = {
    "qwen2_vl": _qwen2_vl,
    "qwen2_5_vl": build_tiny_qwen2_5_vl,
    "llava": build_tiny_llava,
    "llava_next": build_tiny_llava_next,
    "idefics3": build_tiny_idefics3,
    "internvl": build_tiny_internvl,
}


def build_tiny(family: str, texts: Iterable[str], out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Build and save a tiny random-init checkpoint of `family`; returns its directory."""
    if family not in BUILDERS:
        raise ValueError(f"unknown model family {family!r}; choose one of {sorted(BUILDERS)}")
    return BUILDERS[family](list(texts), out_dir, seed=seed)
