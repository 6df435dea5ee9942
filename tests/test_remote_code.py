"""Checkpoints that ship their own modelling code load only with `trust_remote_code`, and then run
the whole recipe.

The paper's InternVL2, Phi-3.5-Vision and MiniCPM-V come as hub repositories whose config.json
`auto_map` names Python files inside the repository. None can be downloaded here, so
`remote_checkpoint` writes one such repository offline, shaped like Phi-3.5-Vision's: a custom
config, model and processor class in files next to the weights, the model registered for
`AutoModelForCausalLM` only (not `AutoModelForImageTextToText`) and the processor for
`AutoProcessor`. The classes subclass transformers' Qwen2-VL, so the tiny random-init weights of
`evostar.models.tiny` fit them; what is tested is evostar's path through transformers'
dynamic-module loading, not those classes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_model
from typer.testing import CliRunner

from evostar.cli import app
from evostar.config import (
    Config,
    DataConfig,
    EvalConfig,
    EvolveConfig,
    GenerationConfig,
    ModelConfig,
    OptimConfig,
    WarmupConfig,
)
from evostar.data.gym import build_gym
from evostar.data.loaders import load_samples
from evostar.demo import gym_texts
from evostar.models.hub import ModelLoadError, load_model, load_policy, load_processor, save_model_and_processor
from evostar.models.inputs import VLMInputs
from evostar.models.tiny import TinyModelSpec, build_tiny_qwen2_vl
from evostar.pipeline import run_experiment
from evostar.rollout.hf import generate
from evostar.train import Example, SFTTrainer

pytestmark = pytest.mark.usefixtures("one_thread")

CODE = {
    "configuration_evostar_remote.py": """
from transformers import Qwen2VLConfig


class RemoteVLConfig(Qwen2VLConfig):
    model_type = "evostar_remote_vl"
""",
    "modeling_evostar_remote.py": """
from transformers import Qwen2VLForConditionalGeneration

from .configuration_evostar_remote import RemoteVLConfig


class RemoteVLForCausalLM(Qwen2VLForConditionalGeneration):
    config_class = RemoteVLConfig
""",
    "processing_evostar_remote.py": '''
from transformers import Qwen2VLProcessor


class RemoteVLProcessor(Qwen2VLProcessor):
    """Qwen2-VL's processor without the video processor (which needs torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        kwargs.pop("video_processor", None)
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    def _get_num_multimodal_tokens(self, image_sizes=None, video_sizes=None, **kwargs):
        return super()._get_num_multimodal_tokens(image_sizes=image_sizes, **kwargs)
''',
}


@pytest.fixture(scope="module")
def gym(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gym")
    build_gym(root, seed=0, n_seed=24, n_train=8, n_val=4, n_test_id=4, n_test_ood=4)
    return root


@pytest.fixture(scope="module")
def remote_checkpoint(gym: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("remote") / "remote-vl"
    build_tiny_qwen2_vl(gym_texts(gym), path, TinyModelSpec(num_layers=1), seed=0)
    # transformers renames Qwen2-VL's saved weight names on load, but not for another model_type:
    # save them under the names the model holds, which the subclass shares
    save_model(load_model(path), str(path / "model.safetensors"), metadata={"format": "pt"})
    for name, code in CODE.items():
        (path / name).write_text(code.lstrip())
    config = json.loads((path / "config.json").read_text())
    config.update(
        model_type="evostar_remote_vl",
        architectures=["RemoteVLForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_evostar_remote.RemoteVLConfig",
            "AutoModelForCausalLM": "modeling_evostar_remote.RemoteVLForCausalLM",
            "AutoProcessor": "processing_evostar_remote.RemoteVLProcessor",
        },
    )
    (path / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("processor_config.json", "tokenizer_config.json"):
        record = json.loads((path / name).read_text())
        record["processor_class"] = "RemoteVLProcessor"
        record["auto_map"] = {"AutoProcessor": "processing_evostar_remote.RemoteVLProcessor"}
        (path / name).write_text(json.dumps(record, indent=2))
    return path


def test_custom_code_is_refused_unless_allowed(remote_checkpoint: Path, gym: Path) -> None:
    for load in (load_model, load_processor):
        with pytest.raises(ModelLoadError, match="model.trust_remote_code=true"):
            load(remote_checkpoint)
    result = CliRunner().invoke(app, ["eval", "--model", str(remote_checkpoint), "--data", str(gym / "val.json")])
    assert result.exit_code == 2, result.output
    assert "--trust-remote-code" in result.output and "Traceback" not in result.output


def test_custom_code_loads_when_allowed(remote_checkpoint: Path) -> None:
    model = load_model(remote_checkpoint, trust_remote_code=True)
    processor = load_processor(remote_checkpoint, trust_remote_code=True)
    # the classes come from the checkpoint's files, through transformers' dynamic modules
    assert type(model).__name__ == "RemoteVLForCausalLM"
    assert type(model).__module__.startswith("transformers_modules.")
    assert type(processor).__name__ == "RemoteVLProcessor"
    assert type(processor).__module__.startswith("transformers_modules.")
    assert model.config.model_type == "evostar_remote_vl"


def test_sft_step_save_and_reload(remote_checkpoint: Path, gym: Path, tmp_path: Path) -> None:
    model = load_model(remote_checkpoint, trust_remote_code=True)
    processor = load_processor(remote_checkpoint, trust_remote_code=True)
    io = VLMInputs(processor)
    samples = load_samples(gym / "seed.json")[:4]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = SFTTrainer(model, io, OptimConfig(lr=1e-2, batch_size=4)).train(
        [Example(s, s.target) for s in samples], 1, seed=0, progress=False
    )
    assert np.isfinite(stats["loss"]) and stats["tokens"] > 0
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())

    def greedy(m, p):
        return [r.text for r in generate(m, VLMInputs(p), samples, temperature=0.0, max_new_tokens=8, progress=False)]

    saved = tmp_path / "saved"
    save_model_and_processor(model, processor, saved)
    for name in CODE:  # the code travels with the checkpoint, so it reloads anywhere
        assert (saved / name).is_file(), name
    assert "AutoModelForCausalLM" in json.loads((saved / "config.json").read_text())["auto_map"]
    with pytest.raises(ModelLoadError, match="trust_remote_code"):
        load_model(saved)
    reloaded = load_model(saved, trust_remote_code=True)
    assert type(reloaded).__name__ == "RemoteVLForCausalLM"
    state, state2 = model.state_dict(), reloaded.state_dict()
    assert state.keys() == state2.keys() and all(torch.equal(state[k], state2[k]) for k in state)
    assert greedy(reloaded, load_processor(saved, trust_remote_code=True)) == greedy(model, processor)


def test_run_end_to_end_with_trust_remote_code(remote_checkpoint: Path, gym: Path, tmp_path: Path) -> None:
    cfg = Config(
        output_dir=str(tmp_path / "run"),
        seed=0,
        device="cpu",
        progress=False,
        model=ModelConfig(path=str(remote_checkpoint), trust_remote_code=True),
        data=DataConfig(
            train=str(gym / "train.json"),
            val=str(gym / "val.json"),
            test={"test_id": str(gym / "test_id.json")},
            seed_cot=str(gym / "seed.json"),
        ),
        gen=GenerationConfig(k=2, max_new_tokens=12, batch_size=64, eval_batch_size=64),
        warmup=WarmupConfig(steps=4, eval_every=2, optim=OptimConfig(lr=3e-3, batch_size=8, schedule="constant")),
        evolve=EvolveConfig(iterations=1, interval=1.0, steps_per_iteration=2, optim=OptimConfig(batch_size=4)),
        eval=EvalConfig(pass_k=0),
    )
    summary = run_experiment(cfg)
    assert summary["iterations"][0]["responses"] == 8 * 2
    assert set(summary["accuracy"]) == {"base", "warmup", "final"}
    # resume reloads checkpoints through the same switch
    resumed = load_policy(cfg.model, Path(summary["run_dir"]) / "checkpoints" / "iter_1")
    assert type(resumed).__name__ == "RemoteVLForCausalLM"
