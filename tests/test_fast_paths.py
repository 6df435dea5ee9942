"""The CPU fast paths compute what the plain transformers paths compute: attention kernels
(`evostar.models.attention`), the SFT loss at labelled positions only and without the padding
mask, the in-place KV cache (`evostar.rollout.cache`) and the shared prefill of the K samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tiny_families import FAMILIES, build_tiny
from transformers.cache_utils import DynamicLayer

from evostar.config import OptimConfig
from evostar.launch import keep_freed_memory
from evostar.models import attention
from evostar.models.attention import use_stock_attention
from evostar.models.hub import load_model, load_processor
from evostar.models.inputs import VLMInputs
from evostar.records import Sample
from evostar.rollout import hf
from evostar.rollout.cache import GrowingCache, GrowingLayer
from evostar.train.sft import response_loss_sum

pytestmark = pytest.mark.usefixtures("one_thread")

RESPONSES = ["1 + 2 = 3\n\n# Answer\n\n3", "# Answer\n\n3", "4 + 5 = 9\n\n9 + 1 = 10\n\n# Answer\n\n10"]


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> list[Sample]:
    """Real PNGs of two sizes (per-image patch counts differ inside a batch) and questions of
    different lengths (padding inside a batch)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    out = []
    for i, (w, h) in enumerate([(84, 28), (56, 28), (84, 28)]):
        path = root / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        question = "What is the sum of the digits?" + " Think step by step." * i
        out.append(Sample(id=f"s{i}", question=question, image=str(path), answer="3"))
    return out


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request: pytest.FixtureRequest, samples, tmp_path_factory) -> Path:
    texts = [s.question for s in samples] + RESPONSES
    return build_tiny(request.param, texts * 4, tmp_path_factory.mktemp("ckpt") / request.param, seed=0)


def test_loader_switches_cpu_models_to_evostar_attention(checkpoint: Path) -> None:
    model = load_model(checkpoint)
    names = {config._attn_implementation for config in attention.attention_configs(model).values()}
    assert names <= {attention.SDPA, attention.VARLEN}, names
    if model.config.model_type in attention.VARLEN_VISION_TYPES:
        assert model.config.vision_config._attn_implementation == attention.VARLEN


@pytest.mark.parametrize("autocast", ["", "bf16"])
def test_sft_loss_and_gradients_match_plain_transformers(checkpoint: Path, samples, autocast: str) -> None:
    """evostar's loss (fast attention, logits at labelled positions, no padding mask) against
    the plain forward (transformers' sdpa, every position's logits, the padding mask)."""
    io = VLMInputs(load_processor(checkpoint))
    batch = io.collate_sft(samples, RESPONSES)
    assert (batch["attention_mask"] == 0).any(), "the batch must contain padding"
    cfg = OptimConfig(autocast=autocast)

    def plain_loss(model: torch.nn.Module) -> torch.Tensor:
        use_stock_attention(model)
        inputs = dict(batch)
        labels = inputs.pop("labels")
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(autocast)):
            logits = model(**inputs).logits[:, :-1].float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), reduction="sum")

    results = []
    for loss_fn in (plain_loss, lambda m: response_loss_sum(m, batch, cfg)):
        model = load_model(checkpoint)
        model.train()
        loss = loss_fn(model)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((loss.item(), grads))
    (plain, plain_grads), (fast, fast_grads) = results
    tol = 1e-5 if not autocast else 2e-2  # bf16 products: rounding differs with the kernel
    assert fast == pytest.approx(plain, rel=tol)
    scale = plain_grads.abs().max()
    assert ((fast_grads - plain_grads).abs().max() / scale) < (1e-5 if not autocast else 5e-2)


def test_generation_with_the_growing_cache_and_shared_prefill_matches_plain_generate(checkpoint: Path, samples) -> None:
    """Greedy continuations: transformers' generate with its DynamicCache and sdpa, evostar's
    greedy path (growing cache), and K=2 samples through the shared prefill with top-p so small
    that the sampler must take the most likely token: all the same texts."""
    model = load_model(checkpoint).eval()
    io = VLMInputs(load_processor(checkpoint))
    use_stock_attention(model)
    batch = io.collate_prompts(samples)
    with torch.inference_mode():
        out = model.generate(
            **batch, max_new_tokens=8, do_sample=False, eos_token_id=io.stop_token_ids, pad_token_id=io.pad_id
        )
    plain = [
        t.strip() for t in io.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    ]
    model = load_model(checkpoint).eval()
    greedy = [r.text for r in hf.generate(model, io, samples, temperature=0, max_new_tokens=8, progress=False)]
    assert greedy == plain
    assert hf.shares_prefill(model) == (model.config.model_type in hf.PREFILL_SHARING_TYPES)
    if not hf.shares_prefill(model):
        pytest.skip(f"{model.config.model_type}: no shared prefill")
    torch.manual_seed(0)
    shared = hf.generate(model, io, samples, k=2, temperature=1.0, top_p=1e-9, max_new_tokens=8, progress=False)
    assert [r.text for r in shared] == [t for t in plain for _ in range(2)]


def test_math_attention_matches_sdpa_with_grouped_heads_and_masks() -> None:
    torch.manual_seed(0)
    batch, heads, kv_heads, q_len, kv_len, dim = 2, 4, 2, 3, 5, 8
    q = torch.randn(batch, heads, q_len, dim, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, kv_len, dim, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, kv_len, dim, dtype=torch.float64)
    rep_k, rep_v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    mask = torch.rand(batch, 1, q_len, kv_len) > 0.3
    mask[..., 0] = True  # every query attends to something (SDPA gives NaN otherwise)
    for m in (None, mask, torch.zeros(batch, 1, q_len, kv_len, dtype=torch.float64).masked_fill(~mask, -1e9)):
        want = F.scaled_dot_product_attention(q, rep_k, rep_v, attn_mask=m)
        got = attention._math_attention(q, k, v, m, None, 0.0, False)
        torch.testing.assert_close(got, want)
    causal = attention._math_attention(q, k, v, None, 0.5, 0.0, True)
    bottom_right = torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)
    torch.testing.assert_close(
        causal, F.scaled_dot_product_attention(q, rep_k, rep_v, attn_mask=bottom_right, scale=0.5)
    )
    nothing = torch.zeros(batch, 1, q_len, kv_len, dtype=torch.bool)  # a left-padded query row
    assert torch.isfinite(attention._math_attention(q, k, v, nothing, None, 0.0, False)).all()


@pytest.mark.parametrize("lengths", [[6, 6, 6], [4, 7, 2]])
def test_varlen_attention_is_per_sequence_attention(lengths: list[int]) -> None:
    torch.manual_seed(0)
    heads, dim, total = 2, 8, sum(lengths)
    q, k, v = (torch.randn(1, heads, total, dim) for _ in range(3))
    cu = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32)
    want = torch.cat(
        [
            F.scaled_dot_product_attention(*(t[:, :, a:b] for t in (q, k, v)))
            for a, b in zip(cu[:-1], cu[1:], strict=True)
        ],
        dim=2,
    ).transpose(1, 2)
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 3e-2)):
        out, _ = attention.varlen_forward(
            None, q.to(dtype), k.to(dtype), v.to(dtype), None, cu_seq_lens_q=cu, cu_seq_lens_k=cu
        )
        torch.testing.assert_close(out.float(), want, atol=tol, rtol=tol)


def test_growing_layer_holds_what_a_dynamic_layer_holds() -> None:
    torch.manual_seed(0)
    grow, plain = GrowingLayer(), DynamicLayer()
    steps = [torch.randn(3, 2, n, 4) for n in (5, 1, 1, 70, 1)]  # 70: past the first capacity
    for t in steps:
        gk, gv = grow.update(t, -t)
        pk, pv = plain.update(t, -t)
        torch.testing.assert_close(gk, pk, atol=0, rtol=0)
        torch.testing.assert_close(gv, pv, atol=0, rtol=0)
    for op, arg in (("batch_select_indices", torch.tensor([2, 0])), ("batch_repeat_interleave", 2), ("crop", -3)):
        getattr(grow, op)(arg)
        getattr(plain, op)(arg)
        t = torch.randn(grow.keys.shape[0], 2, 1, 4)
        torch.testing.assert_close(grow.update(t, t)[0], plain.update(t, t)[0], atol=0, rtol=0)
    assert grow.get_seq_length() == plain.get_seq_length()


def test_growing_cache_replaces_only_full_attention_layers(checkpoint: Path) -> None:
    model = load_model(checkpoint)
    cache = GrowingCache(model.config)
    assert cache.layers and all(isinstance(layer, GrowingLayer) for layer in cache.layers)


def test_keep_freed_memory_is_safe_to_call_twice() -> None:
    assert keep_freed_memory() == keep_freed_memory()
