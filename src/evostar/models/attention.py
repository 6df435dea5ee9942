"""Attention kernels for CPU training and sampling, registered with transformers' `AttentionInterface`.

Two things cost a small VLM on a CPU far more than their arithmetic:
- Qwen2-VL's vision tower attends one image at a time unless flash-attention is requested (one
  SDPA call per image and layer, plus a split and a concatenation). `VARLEN` takes the same
  `cu_seqlens` as flash-attention and runs all images in one SDPA call: a reshape when the images
  have the same number of patches (the gym's do), a block-diagonal mask when they differ.
- Under bf16 autocast, torch's CPU SDPA backward in bf16 is many times slower than in float32,
  while bf16 matrix multiplies are about twice as fast as float32 ones on CPUs with bf16 dot
  products. Under autocast, and for bf16 weights (the CPU rollout copy), both functions compute
  attention as two matrix products (in bf16, like every linear layer) around a float32 softmax;
  the fused kernel is slower for the small head sizes and short sequences of CPU-scale models.
  In float32 they call torch's SDPA and compute exactly what transformers' sdpa does.

`use_cpu_attention(model)` switches a loaded model's sdpa attention to these; the names are not
written to `config.json`, so a saved checkpoint loads anywhere with its usual attention.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

SDPA = "evostar_sdpa"
# transformers hands `cu_seqlens` to an attention function only when its name says "flash".
VARLEN = "evostar_flash_varlen_sdpa"
# Model types whose vision attention splits by `cu_seqlens` when flash-attention is not requested.
VARLEN_VISION_TYPES = ("qwen2_vl", "qwen2_5_vl")


def _use_math(query: torch.Tensor) -> bool:
    return torch.is_autocast_enabled(query.device.type) or query.dtype in (torch.bfloat16, torch.float16)


def _math_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float | None,
    dropout: float,
    is_causal: bool,
) -> torch.Tensor:
    """softmax(q k^T) v with the two products under autocast and the softmax in float32.

    `mask` is boolean (True: attend) or additive, broadcastable to the scores. A row with nothing
    to attend (a left-padded query) gets uniform weights instead of NaN. Returns
    `(batch, heads, q_len, head_dim)`.
    """
    batch, heads, q_len, dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    # Grouped-query attention without copying keys and values per query head: the `groups` query
    # heads that share a key/value head (transformers' repeat_kv order) become extra query rows.
    grouped = query.reshape(batch, kv_heads, groups * q_len, dim)
    scale = scaling if scaling is not None else dim**-0.5
    scores = (torch.matmul(grouped, key.transpose(-1, -2)).float() * scale).view(batch, kv_heads, groups, q_len, kv_len)
    if is_causal:
        mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=scores.device).tril(kv_len - q_len)
    if mask is not None:
        mask = mask[..., :kv_len]
        if mask.dim() == 4:  # (batch, 1 or heads, q_len, kv_len)
            mask = (
                mask.unsqueeze(2)
                if mask.shape[1] == 1
                else mask.reshape(mask.shape[0], kv_heads, groups, q_len, kv_len)
            )
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask.float()
    probs = torch.softmax(scores, dim=-1).view(batch, kv_heads, groups * q_len, kv_len)
    if dropout > 0:
        probs = F.dropout(probs, p=dropout, training=True)
    return torch.matmul(probs.to(value.dtype), value).view(batch, heads, q_len, dim)


def sdpa_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' sdpa in float32; math attention under autocast or in half precision (torch's
    CPU bf16 SDPA is slow, most of all its backward and single-token decoding)."""
    if not _use_math(query):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    if is_causal is None:  # as transformers' sdpa decides it
        is_causal = query.shape[2] > 1 and attention_mask is None and getattr(module, "is_causal", True)
    out = _math_attention(query, key, value, attention_mask, scaling, dropout, bool(is_causal))
    return out.transpose(1, 2).contiguous(), None


def varlen_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    is_causal: bool = False,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Bidirectional attention within each packed sequence of `cu_seq_lens_q`, in one call.

    Inputs are `(1, heads, total, head_dim)` as the vision tower passes them; the output is
    `(1, total, heads, head_dim)` like every transformers attention function.
    """
    same_keys = cu_seq_lens_k is None or torch.equal(cu_seq_lens_k, cu_seq_lens_q)
    if cu_seq_lens_q is None or is_causal or not same_keys:
        return sdpa_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    heads, total, dim = query.shape[1], query.shape[2], query.shape[3]
    lengths = (cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).tolist()
    mask = None
    if len(set(lengths)) == 1:  # equal lengths: a batch of independent sequences
        n, length = len(lengths), lengths[0]
        query, key, value = (t.reshape(heads, n, length, dim).transpose(0, 1) for t in (query, key, value))
    else:  # one block-diagonal mask over the packed sequences
        seq_id = torch.repeat_interleave(
            torch.arange(len(lengths), device=query.device), torch.tensor(lengths, device=query.device)
        )
        mask = seq_id[:, None] == seq_id[None, :]
    if _use_math(query):
        out = _math_attention(query, key, value, mask, scaling, dropout, False)
    else:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling)
    # (n, heads, length, dim) or (1, heads, total, dim) -> (1, total, heads, dim)
    return out.permute(0, 2, 1, 3).reshape(1, total, heads, dim), None


AttentionInterface.register(SDPA, sdpa_forward)
AttentionInterface.register(VARLEN, varlen_forward)
AttentionMaskInterface.register(SDPA, sdpa_mask)
AttentionMaskInterface.register(VARLEN, sdpa_mask)


def attention_configs(model: torch.nn.Module) -> dict[str, Any]:
    """Where transformers reads a model's attention implementation: its config (key "") and each
    sub-config present (text_config, vision_config, ...)."""
    config = model.config
    subs = {name: getattr(config, name, None) for name in getattr(config, "sub_configs", {})}
    return {"": config, **{name: sub for name, sub in subs.items() if sub is not None}}


def use_stock_attention(model: torch.nn.Module) -> None:
    """transformers' own sdpa everywhere, as a plain transformers or TRL user has it."""
    for config in attention_configs(model).values():  # the top config first: it may reset the others
        config._attn_implementation = "sdpa"


def use_cpu_attention(model: torch.nn.Module) -> bool:
    """Switch a model that uses sdpa to the functions above; True if anything changed.

    Only sdpa configs change (eager, flash-attention or a custom kernel the user chose stay).
    """
    if getattr(model, "config", None) is None:
        return False
    configs = attention_configs(model)
    config = configs.pop("")
    # Decide from the implementations as loaded: setting the top config's may reset its sub-configs.
    chosen = [
        (sub, VARLEN if name == "vision_config" and config.model_type in VARLEN_VISION_TYPES else SDPA)
        for name, sub in configs.items()
        if getattr(sub, "_attn_implementation", None) == "sdpa"
    ]
    top_is_sdpa = getattr(config, "_attn_implementation", None) == "sdpa"
    if top_is_sdpa:
        config._attn_implementation = SDPA
    for sub, name in chosen:
        sub._attn_implementation = name
    return top_is_sdpa or bool(chosen)
