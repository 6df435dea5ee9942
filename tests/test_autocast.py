"""`optim.autocast`: bf16 forward/backward over float32 weights and AdamW (mixed precision).

Pure bf16 weights do not learn at the paper's lr 1e-6 (an AdamW step of ~1e-6 rounds away: a
bf16 weight of 0.02 moves in steps of 2^-13 = 1.2e-4); float32 weights with a bf16 autocast
forward do. Off (the default) must leave training bit-for-bit as it was.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from evostar.config import OptimConfig
from evostar.models.attention import use_stock_attention
from evostar.models.hub import load_model, load_processor
from evostar.models.inputs import VLMInputs
from evostar.models.tiny import TinyModelSpec, build_tiny_qwen2_vl
from evostar.records import Sample
from evostar.train import Example, SFTTrainer

RESPONSES = ["1 + 2 = 3\n\n# Answer\n\n3", "# Answer\n\n7", "4 + 5 = 9\n\n# Answer\n\n9"]
STEPS = 3


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    texts = ["Sum of the digits?", *RESPONSES] * 3
    root = tmp_path_factory.mktemp("autocast")
    return build_tiny_qwen2_vl(texts, root / "model", TinyModelSpec(num_layers=1))


@pytest.fixture(scope="module")
def io(checkpoint: Path) -> VLMInputs:
    return VLMInputs(load_processor(checkpoint))


@pytest.fixture(scope="module")
def examples(tmp_path_factory: pytest.TempPathFactory) -> list[Example]:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    out = []
    for i, response in enumerate(RESPONSES):
        path = root / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (28, 84, 3), dtype=np.uint8)).save(path)
        out.append(Example(Sample(id=f"s{i}", question=f"Sum of the digits? ({i})", image=str(path)), response))
    return out


def _train(checkpoint, io, examples, dtype=torch.float32, **optim):
    """STEPS optimizer steps from the checkpoint; (per-step losses, initial and final weights)."""
    model = load_model(checkpoint, dtype=dtype)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses: list[float] = []
    trainer = SFTTrainer(model, io, OptimConfig(batch_size=len(examples), schedule="constant", **optim))
    trainer.train(examples, STEPS, seed=0, progress=False, on_step=lambda _, loss: losses.append(loss))
    return losses, before, dict(model.named_parameters())


@pytest.fixture(scope="module")
def fp32_run(checkpoint, io, examples):
    return _train(checkpoint, io, examples, lr=1e-3)


@pytest.fixture(scope="module")
def bf16_run(checkpoint, io, examples):
    return _train(checkpoint, io, examples, lr=1e-3, autocast="bf16")


def _changed_share(before, after) -> float:
    changed = sum(int((before[n] != p.detach()).sum()) for n, p in after.items())
    return changed / sum(p.numel() for p in after.values())


def test_bf16_autocast_trains_float32_weights(fp32_run, bf16_run):
    fp32 = fp32_run[0]
    bf16, before, after = bf16_run
    assert all(np.isfinite(bf16))
    assert bf16[0] == pytest.approx(fp32[0], rel=5e-2)
    assert bf16[0] != fp32[0]  # the forward really ran in bf16
    assert bf16[-1] < bf16[0]  # and it learns
    assert all(p.dtype == torch.float32 for p in after.values())  # weights stay fp32
    assert _changed_share(before, after) > 0.9


def test_small_lr_moves_float32_weights_not_pure_bf16(checkpoint, io, examples):
    """The motivating case: lr 1e-6 (the paper's) with bf16 compute."""
    _, before, after = _train(checkpoint, io, examples, lr=1e-6, autocast="bf16")
    assert _changed_share(before, after) > 0.9
    _, before, after = _train(checkpoint, io, examples, torch.bfloat16, lr=1e-6)
    assert _changed_share(before, after) < 0.5  # pure bf16: most updates round away


def test_off_is_bitwise_unchanged(checkpoint, io, examples, fp32_run):
    default, _, w_default = fp32_run
    off, _, w_off = _train(checkpoint, io, examples, lr=1e-3, autocast="")
    ref, w_ref = _reference_train(checkpoint, io, examples, lr=1e-3)
    assert default == off
    # The reference is the plain transformers step; evostar's (logits at labelled positions only,
    # no padding mask, its CPU attention) sums the same terms in another order.
    assert off == pytest.approx(ref, rel=1e-5)
    for name, p in w_default.items():
        assert torch.equal(p, w_off[name]), name
        torch.testing.assert_close(p, w_ref[name], rtol=1e-4, atol=1e-6)


def _reference_train(checkpoint, io, examples, lr):
    """The SFT step as written before `optim.autocast` existed (one micro-batch, constant LR), on
    transformers' own sdpa attention."""
    model = load_model(checkpoint).train()
    use_stock_attention(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=lr, weight_decay=0.0, betas=(0.9, 0.999), fused=True
    )  # as SFTTrainer on CPU
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(STEPS):
        chunk = [examples[i] for i in rng.permutation(len(examples)).tolist()]
        batch = io.collate_sft([e.sample for e in chunk], [e.response for e in chunk])
        labels = batch.pop("labels")
        n = int((labels[:, 1:] != -100).sum())
        logits = model(**batch).logits[:, :-1].float()
        loss_sum = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
        )
        (loss_sum / n).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss_sum.item() / n)
    return losses, dict(model.named_parameters())


@pytest.mark.parametrize("value", ["fp16", "float16", "bfloat16"])
def test_unsupported_values_are_refused(checkpoint, io, value):
    model = load_model(checkpoint)
    with pytest.raises(ValueError, match="GradScaler" if value == "fp16" else "choose"):
        SFTTrainer(model, io, OptimConfig(autocast=value))


def test_distributed_trainer_autocast(checkpoint, io, examples, fp32_run, bf16_run):
    """`DistributedSFTTrainer._step` (its own loop) with a one-process accelerator matches
    `SFTTrainer` under bf16 autocast."""
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState

    from evostar.train import DistributedSFTTrainer

    single, _, w_single = bf16_run
    try:
        acc = accelerate.Accelerator(cpu=True)
        model = load_model(checkpoint)
        cfg = OptimConfig(lr=1e-3, batch_size=len(examples), schedule="constant", autocast="bf16")
        trainer = DistributedSFTTrainer(model, io, cfg, acc)
        losses: list[float] = []
        trainer.train(examples, STEPS, seed=0, progress=False, on_step=lambda _, loss: losses.append(loss))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert losses == pytest.approx(single, rel=1e-5)
    assert losses[0] != fp32_run[0][0]  # autocast was on
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, w_single[name], rtol=1e-4, atol=1e-6)
