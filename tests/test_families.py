"""Every supported model family runs the whole recipe: rollouts, SFT with exact prompt masking,
save/reload with identical behaviour, and one self-evolving iteration (tiny random-init models
of the real architectures, built offline)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_families import FAMILIES, build_tiny

from evostar.config import Config, EvalConfig, EvolveConfig, GenerationConfig, ModelConfig, OptimConfig
from evostar.context import open_run
from evostar.data.gym import build_gym
from evostar.data.loaders import load_samples
from evostar.evolve import evolve
from evostar.models.hub import load_model, load_processor, save_model_and_processor
from evostar.models.inputs import IGNORE_INDEX, VLMInputs
from evostar.records import Sample
from evostar.rollout.hf import generate
from evostar.rundir import read_jsonl
from evostar.train import Example, SFTTrainer

MAX_NEW = 8


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def gym(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Sample]]:
    out = tmp_path_factory.mktemp("gym")
    paths = build_gym(out, seed=0, n_seed=4, n_train=6, n_val=4, n_test_id=4, n_test_ood=4)
    return {split: load_samples(paths[split]) for split in ("seed", "train", "val")}


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request: pytest.FixtureRequest, gym, tmp_path_factory) -> Path:
    texts = [t for s in gym["seed"] for t in (s.question, s.target)]
    return build_tiny(request.param, texts, tmp_path_factory.mktemp("ckpt") / request.param, seed=0)


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> list[Sample]:
    """Real PNGs of two sizes, so per-sample image shapes differ inside one batch."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    out = []
    for i, (w, h) in enumerate([(84, 28), (56, 28), (84, 28)]):
        path = root / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        out.append(Sample(id=f"s{i}", question=f"What is the sum of the digits? ({i})", image=str(path), answer="3"))
    return out


RESPONSES = ["1 + 2 = 3\n\n# Answer\n\n3", "# Answer\n\n3", "4 + 5 = 9\n\n9 + 1 = 10\n\n# Answer\n\n10"]


def _greedy(model, io, samples) -> list[str]:
    return [r.text for r in generate(model, io, samples, temperature=0.0, max_new_tokens=MAX_NEW, progress=False)]


def _greedy_ids(model, io, samples) -> list[list[int]]:
    """Greedy token ids without early stop (a random model may end its turn at once, which
    would make comparing texts vacuous)."""
    batch = io.collate_prompts(samples)
    with torch.no_grad():
        out = model.generate(
            **batch, do_sample=False, max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW, pad_token_id=io.pad_id
        )
    return out[:, batch["input_ids"].shape[1] :].tolist()


def test_checkpoint_reloads_as_its_family(checkpoint: Path) -> None:
    processor = load_processor(checkpoint)
    model = load_model(checkpoint)
    assert model.config.model_type == checkpoint.name
    assert 0.5e6 < sum(p.numel() for p in model.parameters()) < 2e6
    io = VLMInputs(processor)
    assert io.turn_end and io.stop_token_ids  # the template ends assistant turns with a token


def test_generate_sampling_and_greedy_are_deterministic(checkpoint: Path, samples: list[Sample]) -> None:
    model, io = load_model(checkpoint), VLMInputs(load_processor(checkpoint))
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append(
            [r.text for r in generate(model, io, samples, k=2, temperature=1.0, max_new_tokens=MAX_NEW, progress=False)]
        )
    assert len(runs[0]) == 2 * len(samples) and all(isinstance(t, str) for t in runs[0])
    assert runs[0] == runs[1]
    greedy = _greedy(model, io, samples)
    assert len(greedy) == len(samples) and greedy == _greedy(model, io, samples)


def test_collate_sft_masks_exactly_the_prompt(checkpoint: Path, samples: list[Sample]) -> None:
    processor = load_processor(checkpoint)
    io = VLMInputs(processor)
    batch = io.collate_sft(samples, RESPONSES)
    image_id = processor.image_token_id
    for i, (sample, response) in enumerate(zip(samples, RESPONSES, strict=True)):
        prompt = io.encode_prompt(sample)["input_ids"][0]
        target = io.encode_response(response)
        n, m = len(prompt), len(target)
        assert int((prompt == image_id).sum()) > 0, "the chat template must emit the image placeholder"
        assert batch["input_ids"][i, :n].tolist() == prompt.tolist()
        labels = batch["labels"][i]
        assert (labels[:n] == IGNORE_INDEX).all()
        assert labels[n : n + m].tolist() == target
        assert (labels[n + m :] == IGNORE_INDEX).all()
        assert image_id not in labels.tolist()


def test_sft_step_then_save_and_reload_is_identical(checkpoint: Path, samples: list[Sample], tmp_path: Path) -> None:
    processor = load_processor(checkpoint)
    model, io = load_model(checkpoint), VLMInputs(processor)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = SFTTrainer(model, io, OptimConfig(lr=1e-2, batch_size=3))
    stats = trainer.train([Example(s, r) for s, r in zip(samples, RESPONSES, strict=True)], 1, seed=0, progress=False)
    assert np.isfinite(stats["loss"]) and stats["tokens"] > 0
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any("embed_tokens" in k for k in changed)
    assert any(("vision" in k or "visual" in k) for k in changed), "no gradient reached the vision tower"

    greedy, greedy_ids = _greedy(model, io, samples), _greedy_ids(model, io, samples)
    save_model_and_processor(model, processor, tmp_path / "saved")
    reloaded = load_model(tmp_path / "saved")
    io2 = VLMInputs(load_processor(tmp_path / "saved"))
    state, state2 = model.state_dict(), reloaded.state_dict()
    assert state.keys() == state2.keys()
    assert all(torch.equal(state[k], state2[k]) for k in state)
    assert _greedy(reloaded, io2, samples) == greedy
    assert _greedy_ids(reloaded, io2, samples) == greedy_ids


def test_one_self_evolving_iteration(checkpoint: Path, gym, tmp_path: Path) -> None:
    cfg = Config(
        output_dir=str(tmp_path / "run"),
        progress=False,
        model=ModelConfig(path=str(checkpoint)),
        gen=GenerationConfig(k=2, max_new_tokens=MAX_NEW, batch_size=64, eval_batch_size=64),
        evolve=EvolveConfig(iterations=1, steps_per_iteration=2, interval=1.0, optim=OptimConfig(batch_size=4)),
        eval=EvalConfig(pass_k=0),
    )
    ctx = open_run(cfg)
    run = ctx.run
    evolve(ctx, load_model(checkpoint), gym["train"], gym["val"], init_dir=checkpoint)
    assert (run.checkpoint_dir("iter_1") / "config.json").exists()
    assert "iter_1" in json.loads((run.root / "progress.json").read_text())["completed"]
    assert len(read_jsonl(run.root / "samples" / "iter_001.jsonl")) == len(gym["train"]) * 2
    load_model(run.checkpoint_dir("iter_1"))  # the checkpoint reloads as a plain HF model
