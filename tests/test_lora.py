"""LoRA / QLoRA switches on a tiny Qwen2-VL: what trains, what stays frozen, and that merged
adapters give an ordinary checkpoint that behaves exactly like the adapter model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("peft")
# peft itself still calls the pre-v5 name.
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

from tiny_families import FAMILIES, build_tiny  # noqa: E402

from evostar.config import OptimConfig  # noqa: E402
from evostar.models import lora  # noqa: E402
from evostar.models.hub import load_model, load_processor, save_model_and_processor  # noqa: E402
from evostar.models.inputs import VLMInputs  # noqa: E402
from evostar.models.tiny import build_tiny_qwen2_vl  # noqa: E402
from evostar.records import Sample  # noqa: E402
from evostar.rollout.hf import generate  # noqa: E402
from evostar.train import Example, SFTTrainer  # noqa: E402

RESPONSES = ["1 + 2 = 3\n\n# Answer\n\n3", "# Answer\n\n7", "4 + 5 = 9\n\n# Answer\n\n9"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    texts = ["What is the sum of the digits?", *RESPONSES] * 3
    return build_tiny_qwen2_vl(texts, tmp_path_factory.mktemp("qwen2_vl") / "model")


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


def _load(checkpoint: Path) -> tuple[torch.nn.Module, VLMInputs]:
    return load_model(checkpoint), VLMInputs(load_processor(checkpoint))


def _step(model: torch.nn.Module, io: VLMInputs, examples: list[Example], lr: float = 1e-2) -> float:
    trainer = SFTTrainer(model, io, OptimConfig(lr=lr, batch_size=len(examples)))
    return trainer.train(examples, 1, seed=0, progress=False)["loss"]


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _changed(before: dict[str, torch.Tensor], model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}


def _greedy(model: torch.nn.Module, io: VLMInputs, examples: list[Example]) -> list[str]:
    samples = [e.sample for e in examples]
    return [r.text for r in generate(model, io, samples, temperature=0.0, max_new_tokens=12, progress=False)]


def _greedy_ids(model: torch.nn.Module, io: VLMInputs, examples: list[Example]) -> list[list[int]]:
    """Greedy token ids with no early stop: a random model often emits end-of-turn first,
    which would make a text comparison vacuous."""
    batch = io.collate_prompts([e.sample for e in examples])
    with torch.no_grad():
        out = model.generate(**batch, do_sample=False, max_new_tokens=12, min_new_tokens=12, pad_token_id=io.pad_id)
    return out[:, batch["input_ids"].shape[1] :].tolist()


def test_adapters_on_the_language_model_only(checkpoint: Path) -> None:
    model = lora.apply_adapters(load_model(checkpoint), lora.AdapterConfig(lora_r=4))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert all(".language_model." in n for n in trainable)
    wrapped = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    counts = lora.trainable_parameters(model)
    assert 0 < counts["trainable"] < 0.1 * counts["total"]


def test_lora_targets_subset_and_typos(checkpoint: Path) -> None:
    model = load_model(checkpoint)
    regex = lora.lora_target_regex(model, ["q_proj", "v_proj"])
    adapted = lora.apply_adapters(model, lora.AdapterConfig(lora_r=2, lora_targets=["q_proj", "v_proj"]))
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in adapted.named_parameters() if p.requires_grad} == {
        "q_proj",
        "v_proj",
    }
    assert "language_model" in regex
    with pytest.raises(ValueError, match="linear layers are"):
        lora.lora_target_regex(load_model(checkpoint), ["qproj"])


def test_sft_step_changes_only_the_adapters(checkpoint: Path, examples: list[Example]) -> None:
    model, io = _load(checkpoint)
    model = lora.apply_adapters(model, lora.AdapterConfig(lora_r=4, lora_alpha=8))
    before = _snapshot(model)
    assert np.isfinite(_step(model, io, examples))
    changed = _changed(before, model)
    assert changed and all(".lora_" in n for n in changed)
    assert any(".lora_B." in n for n in changed)  # B starts at zero: the adapters now act


def test_freeze_vision_and_projector(checkpoint: Path, examples: list[Example]) -> None:
    model, io = _load(checkpoint)
    assert lora.freeze_vision(model) > 0
    before = _snapshot(model)
    _step(model, io, examples)
    changed = _changed(before, model)
    vision = {n for n in before if n.startswith("model.visual.") and ".merger." not in n}
    merger = {n for n in before if ".visual.merger." in n}
    assert vision and not (changed & vision)
    assert changed & merger, "the projector still trains when only the encoder is frozen"
    assert any(".language_model." in n for n in changed)

    model, io = _load(checkpoint)
    lora.freeze_projector(model)
    before = _snapshot(model)
    _step(model, io, examples)
    changed = _changed(before, model)
    assert not (changed & merger) and (changed & vision)


def test_prepare_for_training_switches(checkpoint: Path, examples: list[Example]) -> None:
    cfg = lora.AdapterConfig(lora_r=4, lora_train_projector=True, gradient_checkpointing=True)
    model, io = _load(checkpoint)
    merger_before = {k: v.clone() for k, v in model.model.visual.merger.state_dict().items()}
    model = lora.prepare_for_training(model, cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".merger." in n for n in trainable) and any(".lora_A." in n for n in trainable)
    assert not any(".visual.blocks." in n for n in trainable)
    base = model.get_base_model()  # the attribute's name changed in transformers 5.2x
    assert getattr(base, "is_activation_checkpointing", None) or base.is_gradient_checkpointing
    _step(model, io, examples)
    merger = lora.merge_adapters(model).model.visual.merger.state_dict()
    assert merger.keys() == merger_before.keys()
    assert any(not torch.equal(merger[k], merger_before[k]) for k in merger), "trained projector is merged"

    with pytest.raises(ValueError, match="needs LoRA"):
        lora.prepare_for_training(load_model(checkpoint), lora.AdapterConfig(quantize_4bit=True))


def test_gradient_checkpointing_gives_the_same_step(checkpoint: Path, examples: list[Example]) -> None:
    results = []
    for checkpointing in (False, True):
        model, io = _load(checkpoint)
        torch.manual_seed(0)  # same adapter init
        cfg = lora.AdapterConfig(lora_r=4, gradient_checkpointing=checkpointing)
        model = lora.prepare_for_training(model, cfg)
        loss = _step(model, io, examples)
        results.append((loss, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}))
    (loss0, p0), (loss1, p1) = results
    assert loss0 == pytest.approx(loss1, rel=1e-5)
    assert p0.keys() == p1.keys() and all(torch.allclose(p0[n], p1[n], atol=1e-6) for n in p0)


def test_merged_model_is_plain_and_generates_the_same(
    checkpoint: Path, examples: list[Example], tmp_path: Path
) -> None:
    model, io = _load(checkpoint)
    batch = io.collate_prompts([e.sample for e in examples])
    with torch.no_grad():
        base_logits = model(**batch).logits
    model = lora.apply_adapters(model, lora.AdapterConfig(lora_r=8, lora_alpha=16))
    _step(model, io, examples, lr=5e-2)
    adapter_text, adapter_ids = _greedy(model, io, examples), _greedy_ids(model, io, examples)
    with torch.no_grad():
        adapter_logits = model(**batch).logits
    assert not torch.allclose(adapter_logits, base_logits, atol=1e-3), "the adapters must matter"

    copy = lora.merge_adapters(model, copy_model=True)
    assert lora.has_adapters(model), "copy_model leaves the adapter model as it was"
    merged = lora.merge_adapters(model)
    for plain in (copy, merged):
        assert not lora.has_adapters(plain) and type(plain).__name__ == "Qwen2VLForConditionalGeneration"
        assert not any("lora" in k for k in plain.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(plain(**batch).logits, adapter_logits, rtol=1e-4, atol=1e-4)
        assert _greedy(plain, io, examples) == adapter_text
        assert _greedy_ids(plain, io, examples) == adapter_ids

    save_model_and_processor(merged, io.processor, tmp_path / "merged")
    reloaded, io2 = _load(tmp_path / "merged")
    assert _greedy(reloaded, io2, examples) == adapter_text
    assert _greedy_ids(reloaded, io2, examples) == adapter_ids


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error")
def test_qlora_needs_cuda(checkpoint: Path) -> None:
    cfg = lora.AdapterConfig(lora_r=4, quantize_4bit=True)
    with pytest.raises(lora.QLoRAUnavailableError, match="CUDA GPU"):
        lora.quantization_kwargs(cfg)
    with pytest.raises(lora.QLoRAUnavailableError, match="CUDA GPU"):
        lora.apply_adapters(load_model(checkpoint), cfg)
    assert lora.quantization_kwargs(lora.AdapterConfig(lora_r=4)) == {}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA needs a CUDA GPU")
def test_qlora_step_and_merge_on_gpu(checkpoint: Path, examples: list[Example]) -> None:
    pytest.importorskip("bitsandbytes")
    cfg = lora.AdapterConfig(lora_r=4, quantize_4bit=True)
    model = load_model(checkpoint, dtype=torch.bfloat16, device="cuda", **lora.quantization_kwargs(cfg))
    assert lora.is_quantized(model)
    model = lora.prepare_for_training(model, cfg)
    io = VLMInputs(load_processor(checkpoint))
    assert np.isfinite(_step(model, io, examples))
    merged = lora.merge_adapters(model)
    assert not lora.is_quantized(merged) and not lora.has_adapters(merged)


def test_checkpoint_is_plain_and_adapters_resume_exactly(
    checkpoint: Path, examples: list[Example], tmp_path: Path
) -> None:
    model, io = _load(checkpoint)
    model = lora.apply_adapters(model, lora.AdapterConfig(lora_r=4, lora_train_projector=True))
    _step(model, io, examples, lr=5e-2)
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ids = _greedy_ids(model, io, examples)

    save_model_and_processor(model, io.processor, tmp_path / "ckpt")
    assert lora.has_adapters(model), "saving merges a copy, not the model being trained"
    plain, io2 = _load(tmp_path / "ckpt")
    assert not lora.has_adapters(plain) and _greedy_ids(plain, io2, examples) == ids

    resumed = lora.load_adapters(load_model(checkpoint), tmp_path / "ckpt" / "adapter")
    again = {n: p.detach() for n, p in resumed.named_parameters() if p.requires_grad}
    assert again.keys() == trained.keys()
    assert all(torch.equal(again[n], trained[n]) for n in trained)
    assert _greedy_ids(resumed, io, examples) == ids


@pytest.mark.parametrize("family", FAMILIES)
def test_parts_are_found_in_every_family(family: str, tmp_path: Path) -> None:
    path = build_tiny(family, ["What is 1 + 2?", *RESPONSES], tmp_path / family)
    model = load_model(path)
    lm_name, _ = lora.language_model(model)
    (vision_name, _), *more = lora.vision_modules(model)
    projector_names = [n for n, _ in lora.projector_modules(model)]
    assert not more and projector_names
    lora.freeze_vision(model)
    lora.freeze_projector(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith(lm_name + ".") or n.startswith("lm_head.") for n in trainable)

    adapted = lora.apply_adapters(load_model(path), lora.AdapterConfig(lora_r=2))
    names = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert names and all(".lora_" in n and f".{lm_name}." in n for n in names)
    assert not any(f".{vision_name}." in n for n in names)
