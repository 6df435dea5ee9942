"""Build tiny random-init vision-language models of real transformers architectures.

The CPU-scale gym trains these from scratch. They are ordinary HF checkpoint directories: the
tokenizer is a byte-level BPE trained locally on the gym's text (digits split one per token, so
arithmetic is learnable), with a Qwen-style chat template, and `from_pretrained` reloads them
offline.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from transformers.models.qwen2_vl import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil

from evostar.models.hub import ImageOnlyQwen2VLProcessor, save_model_and_processor

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen-style template without a system turn (every token costs time on 2 cores).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass
class TinyModelSpec:
    """Sizes of a tiny Qwen2-VL; the defaults learn the gym in minutes on a CPU."""

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
    max_position_embeddings: int = 1024


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 512,
    *,
    special_tokens: Sequence[str] = tuple(SPECIAL_TOKENS),
    eos_token: str = "<|im_end|>",
    pad_token: str = "<|endoftext|>",
    extra_special_tokens: dict[str, str] | None = None,
    chat_template: str = CHAT_TEMPLATE,
) -> PreTrainedTokenizerFast:
    """Byte-level BPE over the given texts, one token per digit.

    The defaults give Qwen's special tokens and chat template; other families (LLaVA, Idefics3,
    see `evostar.models.families`) pass their own image tokens, end of turn and template.
    """
    if extra_special_tokens is None:
        extra_special_tokens = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"}
    tok = Tokenizer(models.BPE())
    # Merges may cross spaces (short sequences are what make 2-core training fast), but never
    # digits (arithmetic stays learnable) nor the blank line that separates reasoning steps.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\n\n"), behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=eos_token,
        pad_token=pad_token,
        unk_token=None,
        extra_special_tokens=extra_special_tokens,
    )
    fast.chat_template = chat_template
    return fast


def qwen_text_config(spec, tokenizer: PreTrainedTokenizerFast) -> dict:
    """Text-model config shared by the tiny Qwen2-VL and Qwen2.5-VL (M-RoPE split of head_dim)."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    half = spec.hidden_size // spec.num_heads // 2
    mrope = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]  # temporal, height, width
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
        bos_token_id=None,
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )


def qwen_vision_token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    """The image/video/vision-boundary token ids a Qwen-VL config names."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )


def save_tiny_qwen(model, tokenizer: PreTrainedTokenizerFast, patch_size: int, out_dir: str | os.PathLike) -> Path:
    """Generation settings, an image-only Qwen2-VL processor, and the checkpoint on disk."""
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    model.generation_config.bos_token_id = None
    unit = patch_size * 2  # patch x merge: image sides are rounded to multiples of this
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=patch_size,
        merge_size=2,
        temporal_patch_size=2,
        size={"shortest_edge": unit * unit, "longest_edge": unit * unit * 64},
    )
    processor = ImageOnlyQwen2VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE
    )
    out = Path(out_dir)
    save_model_and_processor(model, processor, out)
    return out


def build_tiny_qwen2_vl(
    texts: Iterable[str], out_dir: str | os.PathLike, spec: TinyModelSpec | None = None, seed: int = 0
) -> Path:
    """Create and save a random-init tiny Qwen2-VL with a locally trained tokenizer."""
    spec = spec or TinyModelSpec()
    tokenizer = train_tokenizer(texts, spec.vocab_size)
    config = Qwen2VLConfig(
        text_config=qwen_text_config(spec, tokenizer),
        vision_config=dict(
            depth=spec.vision_depth,
            embed_dim=spec.vision_width,
            hidden_size=spec.hidden_size,
            num_heads=spec.vision_heads,
            mlp_ratio=2,
            patch_size=spec.patch_size,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        **qwen_vision_token_ids(tokenizer),
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    return save_tiny_qwen(model, tokenizer, spec.patch_size, out_dir)
