"""Rollouts with transformers' `generate`: batched, left-padded, stopping at end of turn."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import Cache, LogitsProcessor, LogitsProcessorList

from evostar.models.hub import forward_accepts
from evostar.models.inputs import SEQUENCE_KEYS, VLMInputs
from evostar.records import Response, Sample
from evostar.rollout.cache import GrowingCache


class InverseCDFSampler(LogitsProcessor):
    """Draws the next token itself and leaves `generate` nothing but an argmax to take.

    Temperature and top-p are applied here, then one uniform number per row is looked up in the
    cumulative probabilities (inverse-CDF sampling: the same distribution as `torch.multinomial`).
    On CPU `multinomial` is a large share of a tiny model's decode step; this is a small one
    (benchmarks/bench_rollout.py measures the backends). The returned scores are 0 at the drawn token and
    -inf elsewhere, so `generate` runs in greedy mode and takes exactly the drawn token.
    Randomness comes from torch's global generator, so `torch.manual_seed` fixes the samples.
    """

    def __init__(self, temperature: float, top_p: float = 1.0) -> None:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        self.temperature = temperature
        self.top_p = top_p

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            # keep the smallest prefix whose mass reaches top_p (always the most likely token)
            outside = sorted_probs.cumsum(-1) - sorted_probs >= self.top_p
            sorted_probs = sorted_probs.masked_fill(outside, 0.0)
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        cdf = probs.cumsum(-1)
        u = torch.rand(cdf.shape[0], 1, device=cdf.device, dtype=cdf.dtype) * cdf[:, -1:]
        token = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(-1, token, 0.0)


# Families whose generation continues exactly from a prefilled, batch-repeated cache (checked
# against the unshared path in tests/test_rollout.py).
PREFILL_SHARING_TYPES = ("qwen2_vl", "qwen2_5_vl", "llava", "llava_next", "idefics3", "internvl")


def shares_prefill(model: torch.nn.Module) -> bool:
    return getattr(model.config, "model_type", None) in PREFILL_SHARING_TYPES


def cache_argument(model: torch.nn.Module) -> str:
    """The name under which this transformers version takes a KV cache (`cache` since 5.2x)."""
    return "cache" if forward_accepts(model, "cache") else "past_key_values"


def generate_kwargs(
    model: torch.nn.Module,
    io: VLMInputs,
    *,
    greedy: bool,
    own_sampler: bool,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    n: int,
) -> dict:
    """`model.generate` options for one batch: greedy, evostar's CPU sampler, or transformers'
    sampler with `n` return sequences; on CPU a fresh `GrowingCache`."""
    kwargs: dict = dict(max_new_tokens=max_new_tokens, eos_token_id=io.stop_token_ids, pad_token_id=io.pad_id)
    if greedy or own_sampler:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0, num_return_sequences=n)
    if own_sampler:
        kwargs["logits_processor"] = LogitsProcessorList([InverseCDFSampler(temperature, top_p)])
    if next(model.parameters()).device.type == "cpu":
        kwargs[cache_argument(model)] = GrowingCache(model.config)
    return kwargs


def shared_prefill(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], k: int, cache: Cache
) -> dict[str, torch.Tensor]:
    """Encode each prompt of a left-padded batch once, all but its last token, into `cache`, then
    repeat the cache K times; returns the text inputs, repeated K times, that `generate` continues.

    The last prompt token (text: the generation prompt ends the prompt) is left for `generate`,
    whose first step then reads the cache like any later step. Images and the prompt's prefill run
    once per prompt instead of once per sample.
    """
    prefix = {key: value[:, :-1] if key in SEQUENCE_KEYS else value for key, value in batch.items()}
    model(**prefix, **{cache_argument(model): cache}, use_cache=True, logits_to_keep=1)
    cache.batch_repeat_interleave(k)
    inner = getattr(model, "model", None)
    deltas = getattr(inner, "rope_deltas", None)  # M-RoPE offsets (Qwen2-VL), one row per prompt
    if isinstance(deltas, torch.Tensor) and deltas.shape[0] == batch["input_ids"].shape[0]:
        inner.rope_deltas = deltas.repeat_interleave(k, dim=0)
    return {key: value.repeat_interleave(k, dim=0) for key, value in batch.items() if key in SEQUENCE_KEYS}


@torch.inference_mode()
def generate(
    model: torch.nn.Module,
    io: VLMInputs,
    samples: Sequence[Sample],
    *,
    k: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 64,
    batch_size: int = 512,
    iteration: int = -1,
    desc: str | None = None,
    progress: bool = True,
) -> list[Response]:
    """K responses per sample (greedy when temperature is 0), in sample order.

    `batch_size` counts sequences, so a batch holds `batch_size // k` prompts. On a GPU each
    image is encoded once and expanded inside `generate` (num_return_sequences) for its native
    sampler. On CPU `InverseCDFSampler` draws the tokens (`torch.multinomial` is a large share of
    a small model's decode step), every prompt is encoded once into a KV cache that is then
    repeated K times (`shared_prefill`), and the cache grows in place (`GrowingCache`).
    """
    model.eval()
    greedy = temperature <= 0
    k = 1 if greedy else k
    prompts_per_batch = max(1, batch_size // k)
    # Similar lengths together: less padding, and deterministic given the samples.
    order = sorted(range(len(samples)), key=lambda i: io.encode_prompt(samples[i])["input_ids"].shape[1])
    texts: list[list[str]] = [[] for _ in samples]
    device = next(model.parameters()).device
    own_sampler = not greedy and device.type == "cpu"
    bar = tqdm(total=len(samples) * k, desc=desc or "generate", unit="seq", disable=not progress, leave=False)
    for start in range(0, len(order), prompts_per_batch):
        idx = order[start : start + prompts_per_batch]
        chunk = [samples[i] for i in idx]
        share = own_sampler and k > 1 and shares_prefill(model)
        copies = k if own_sampler and not share else 1  # on CPU without sharing: each prompt K times
        batch = io.collate_prompts([s for s in chunk for _ in range(copies)])
        batch = {key: v.to(device) for key, v in batch.items()}
        gen_kwargs = generate_kwargs(
            model,
            io,
            greedy=greedy,
            own_sampler=own_sampler,
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            n=k,
        )
        if share:  # own_sampler implies CPU, hence a GrowingCache to prefill
            batch = shared_prefill(model, batch, k, gen_kwargs[cache_argument(model)])
        out = model.generate(**batch, **gen_kwargs)
        new_tokens = out[:, batch["input_ids"].shape[1] :]
        decoded = io.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        for j, i in enumerate(idx):
            texts[i] = [t.strip() for t in decoded[j * k : (j + 1) * k]]
        bar.update(len(idx) * k)
    bar.close()
    return [
        Response(sample_id=s.id, text=t, temperature=max(temperature, 0.0), iteration=iteration)
        for s, ts in zip(samples, texts, strict=True)
        for t in ts
    ]


@torch.inference_mode()
def complete(
    model: torch.nn.Module,
    io: VLMInputs,
    samples: Sequence[Sample],
    prefixes: Sequence[str],
    *,
    n: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 64,
    batch_size: int = 512,
    desc: str | None = None,
    progress: bool = False,
) -> list[list[str]]:
    """N continuations of each (sample, assistant-turn prefix) pair, in pair order (one when
    greedy): the Monte-Carlo rollouts of process-reward labelling.

    The prefix is tokenized as `collate_sft` tokenizes a response (without the end of turn), so
    prefix + continuation is what the model would have written in one go; the continuation's
    leading whitespace is kept for that reason. Batching and sampling follow `generate`.
    """
    if len(samples) != len(prefixes):
        raise ValueError(f"complete: {len(samples)} samples but {len(prefixes)} prefixes")
    model.eval()
    greedy = temperature <= 0
    n = 1 if greedy else n
    prefix_ids = [io.tokenizer(p, add_special_tokens=False)["input_ids"] if p else [] for p in prefixes]
    pairs_per_batch = max(1, batch_size // n)
    length = [io.encode_prompt(s)["input_ids"].shape[1] + len(ids) for s, ids in zip(samples, prefix_ids, strict=True)]
    order = sorted(range(len(samples)), key=lambda i: length[i])
    texts: list[list[str]] = [[] for _ in samples]
    device = next(model.parameters()).device
    own_sampler = not greedy and device.type == "cpu"
    repeat = n if own_sampler else 1
    bar = tqdm(total=len(samples) * n, desc=desc or "complete", unit="seq", disable=not progress, leave=False)
    for start in range(0, len(order), pairs_per_batch):
        idx = order[start : start + pairs_per_batch]
        rows = [i for i in idx for _ in range(repeat)]
        batch = io.collate_ids([samples[i] for i in rows], [prefix_ids[i] for i in rows], left=True)
        batch = {key: v.to(device) for key, v in batch.items()}
        gen_kwargs = generate_kwargs(
            model,
            io,
            greedy=greedy,
            own_sampler=own_sampler,
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            n=n,
        )
        out = model.generate(**batch, **gen_kwargs)
        decoded = io.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        for j, i in enumerate(idx):
            texts[i] = [t.rstrip() for t in decoded[j * n : (j + 1) * n]]
        bar.update(len(idx) * n)
    bar.close()
    return texts
