"""`evostar.grpo`: TRL's GRPO from a finished run's warm-up — the prompt tokens TRL builds are
evostar's, the reward is evostar's, a short run writes its result and model, resumes from the
result, and bad input is refused naming the path.

The shared run is the smoke demo cut to its warm-up (a few steps, no PRM, no loop): GRPO needs
nothing else from it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

from evostar import grpo  # noqa: E402
from evostar.demo import run_demo  # noqa: E402
from evostar.errors import RunDirError  # noqa: E402
from evostar.grpo import grpo_reward, grpo_trainer, load_shared, run_grpo  # noqa: E402
from evostar.models.hub import load_model, load_policy, load_processor  # noqa: E402
from evostar.models.inputs import VLMInputs  # noqa: E402
from evostar.pipeline import load_data  # noqa: E402
from evostar.records import Response, Sample  # noqa: E402
from evostar.reward.answer import reward_responses  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

WARMUP_ONLY = [
    "prm.enabled=false",
    "evolve.selection=all",
    "adapt.controller=static",
    "evolve.iterations=0",
    "warmup.steps=4",
    "warmup.eval_every=4",
    "threads=1",
]


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("grpo") / "shared"
    run_demo("smoke", out, seed=0, progress=False, overrides=WARMUP_ONLY)
    return out


@pytest.fixture(scope="module")
def result(shared) -> tuple[Path, dict]:
    out = shared.parent / "grpo"
    return out, run_grpo(shared, out, lr=1e-4, seed=0, max_steps=2)


def test_trl_builds_exactly_the_prompt_tokens_and_image_inputs_evostar_uses(shared, tmp_path):
    from PIL import Image
    from trl.data_utils import apply_chat_template, prepare_multimodal_messages

    cfg, checkpoint = load_shared(shared)
    train = load_data(cfg).train[:2]
    processor = load_processor(cfg.model.path)
    model = load_policy(cfg.model, checkpoint, device="cpu")
    # the run's own prompt, and one with a template and a system turn (a string content in evostar)
    for io in (VLMInputs(processor), VLMInputs(processor, "Solve: {question}", "Think step by step.")):
        trainer = grpo_trainer(cfg, io, model, train, tmp_path / "t", lr=1e-4, seed=0, max_steps=1)
        row = trainer.train_dataset[0]  # what TRL's sampler hands `_generate_and_score_completions`
        sample = train[0]
        assert row["answer"] == sample.answer
        # TRL's own steps: put the image into the messages, then tokenize them for generation
        messages = prepare_multimodal_messages(row["prompt"], images=[row["image"]])
        ids, images, fields = trainer._tokenize_prompts([messages])
        ours = io.encode_prompt(sample)
        assert list(ids[0]) == ours["input_ids"][0].tolist()
        for key in ("pixel_values", "image_grid_thw"):
            assert torch.equal(torch.as_tensor(fields[key]), ours[key])
        # ... and the text TRL renders again for the training forward pass's image inputs
        assert apply_chat_template({"prompt": messages}, processor)["prompt"] == io.prompt_text(sample)
        with Image.open(sample.image) as img:
            assert images[0][0].tobytes() == img.convert("RGB").tobytes()
    assert model.generation_config.eos_token_id == io.stop_token_ids  # stops where evostar's sampler does


def test_rewards_that_differ_in_a_group_move_the_weights_until_the_wall_clock_stops(shared, tmp_path, monkeypatch):
    """The smoke warm-up never answers right, so the real reward's advantages are all zero; a
    reward by response length parity exercises the policy gradient."""
    cfg, checkpoint = load_shared(shared)
    io = VLMInputs(load_processor(cfg.model.path))
    model = load_policy(cfg.model, checkpoint, device="cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def parity(prompts, completions, **_):
        return [float(len(c[-1]["content"]) % 2) for c in completions]

    monkeypatch.setattr(grpo, "grpo_reward", parity)
    train = load_data(cfg).train
    trainer = grpo_trainer(cfg, io, model, train, tmp_path / "t", lr=1e-3, seed=0, max_seconds=0.3)
    args = trainer.args
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps % cfg.gen.k == 0
    trainer.train()
    steps = [row for row in trainer.state.log_history if "grad_norm" in row]
    assert 1 <= trainer.state.global_step == len(steps) < 50  # stopped by the clock, not max_steps
    assert any(row["grad_norm"] > 0 for row in steps)
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_reward_is_evostars_answer_match():
    sample = Sample(id="a", question="q", answer="12")
    texts = ["add them\n\n# Answer\n\n12", "# Answer\n\n13", "no answer at all", "The answer is 12."]
    responses = reward_responses({"a": sample}, [Response("a", t) for t in texts])
    completions = [[{"role": "assistant", "content": t}] for t in texts]
    rewards = grpo_reward(["p"] * 4, completions, answer=["12"] * 4, choices=[None] * 4)
    assert rewards == [1.0 if r.correct else 0.0 for r in responses] == [1.0, 0.0, 0.0, 1.0]
    assert grpo_reward(["p"], [[{"role": "assistant", "content": "# Answer\n\nB"}]], ["7"], [["5", "7"]]) == [1.0]


def test_two_steps_write_the_result_and_a_model_that_reloads(result):
    out, res = result
    assert set(res) == {
        "lr",
        "steps",
        "train_seconds",
        "seconds",
        "val_accuracy",
        "tests",
        "reward_mean_first",
        "reward_mean_last",
        "seed",
    }
    assert res["steps"] == 2 and res["lr"] == 1e-4 and res["seed"] == 0
    assert 0 < res["train_seconds"] < res["seconds"]
    assert set(res["tests"]) == {"test_id", "test_ood"}
    assert all(0.0 <= a <= 1.0 for a in [res["val_accuracy"], *res["tests"].values()])
    assert 0.0 <= res["reward_mean_first"] <= 1.0 and 0.0 <= res["reward_mean_last"] <= 1.0
    assert json.loads((out / "result.json").read_text()) == res
    assert (out / "model" / "model.safetensors").is_file()
    assert not (out / "trainer").exists()
    assert load_model(out / "model").config.model_type == "qwen2_vl"
    load_processor(out / "model")


def test_a_second_call_returns_the_stored_result_without_training(result, shared, monkeypatch):
    out, res = result

    def refuse(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(grpo, "grpo_trainer", refuse)
    assert run_grpo(shared, out, lr=1e-4, seed=0, max_steps=2) == res


def test_bad_input_is_refused(shared, tmp_path):
    with pytest.raises(ValueError, match="max_steps"):
        run_grpo(shared, tmp_path / "o", lr=1e-4, seed=0, max_steps=0, max_seconds=0)
    with pytest.raises(RunDirError, match="nope"):
        run_grpo(tmp_path / "nope", tmp_path / "o", lr=1e-4, seed=0, max_steps=1)
    half = tmp_path / "half"  # a run killed before its warm-up finished
    half.mkdir()
    shutil.copy(shared / "config.yaml", half / "config.yaml")
    (half / "progress.json").write_text(json.dumps({"completed": ["setup", "base"], "results": {}}))
    with pytest.raises(RunDirError, match="warm-up has not finished"):
        run_grpo(half, tmp_path / "o", lr=1e-4, seed=0, max_steps=1)
    assert not (tmp_path / "o").exists()
