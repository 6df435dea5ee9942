"""vLLM rollout backend against the HF one (GPU only; skipped without vllm or CUDA).

A tiny Qwen2-VL is trained a little on the gym so that its greedy outputs are not coin flips; the
vLLM engine is built from the *untrained* checkpoint and receives the trained weights through
`update_weights`, so agreement with HF at temperature 0 also proves the weight push works.
Throughput of both backends is printed (run with -s) and written next to the test's tmp files.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest


def test_get_backend_dispatch_is_lazy() -> None:
    import sys

    from evostar.rollout import get_backend
    from evostar.rollout.hf import generate
    from evostar.rollout.vllm import VLLMGenerator

    loaded = "vllm" in sys.modules
    assert get_backend("hf") is generate
    assert isinstance(get_backend("vllm", gpu_memory_utilization=0.5), VLLMGenerator)
    assert ("vllm" in sys.modules) == loaded  # the engine (and vllm) come on first use
    with pytest.raises(ValueError, match="unknown rollout backend"):
        get_backend("sglang")
    with pytest.raises(ValueError, match="no options"):
        get_backend("hf", dtype="float32")


def test_vllm_missing_gives_install_hint() -> None:
    import torch

    from evostar.rollout.vllm import VLLMGenerator

    try:
        import vllm  # noqa: F401
    except ImportError:
        pass
    else:
        if torch.cuda.is_available():
            pytest.skip("vllm and CUDA are both here")
    with pytest.raises((ImportError, RuntimeError), match=r"evostar\[vllm\]"):
        VLLMGenerator("unused").build()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("vllm")
    from evostar.config import OptimConfig
    from evostar.data.gym import build_gym
    from evostar.data.loaders import load_samples
    from evostar.demo import gym_texts
    from evostar.models.hub import load_model, load_processor
    from evostar.models.inputs import VLMInputs
    from evostar.models.tiny import build_tiny_qwen2_vl
    from evostar.train import Example, SFTTrainer

    work = tmp_path_factory.mktemp("vllm")
    paths = build_gym(work / "data", seed=0, n_seed=64, n_train=256, n_val=64, n_test_id=8, n_test_ood=8)
    init = build_tiny_qwen2_vl(gym_texts(work / "data"), work / "model_init", seed=0)
    io = VLMInputs(load_processor(init))
    seed = load_samples(paths["seed"])
    train = load_samples(paths["train"])
    val = load_samples(paths["val"])
    model = load_model(init, device="cuda")
    torch.manual_seed(0)
    trainer = SFTTrainer(model, io, OptimConfig(lr=2e-3, batch_size=32, schedule="constant"))
    trainer.train([Example(s, s.target) for s in seed + train], 300, seed=0, progress=False)
    model.eval()
    return work, init, io, model, train, val


@pytest.mark.gpu
@pytest.mark.slow
def test_greedy_agrees_with_hf_after_weight_push(setup) -> None:
    from evostar.rollout import get_backend
    from evostar.rollout.hf import generate as hf_generate

    work, init, io, model, _, val = setup
    gen = get_backend("vllm", model_dir=init, dtype="float32", gpu_memory_utilization=0.25, enforce_eager=True)
    gen.build()
    before = gen.generate(io, val, temperature=0.0, max_new_tokens=48, progress=False)  # untrained weights
    hf = hf_generate(model, io, val, temperature=0.0, max_new_tokens=48, batch_size=256, progress=False)
    after = gen(model, io, val, temperature=0.0, max_new_tokens=48)  # pushes the trained weights
    assert [r.sample_id for r in after] == [r.sample_id for r in hf] == [s.id for s in val]
    agree_before = sum(a.text == b.text for a, b in zip(before, hf, strict=True)) / len(hf)
    agree_after = sum(a.text == b.text for a, b in zip(after, hf, strict=True)) / len(hf)
    (work / "agreement.json").write_text(json.dumps({"before_push": agree_before, "after_push": agree_after}))
    print(f"greedy agreement with HF: {agree_after:.2%} (engine before the weight push: {agree_before:.2%})")
    assert agree_after >= 0.8
    assert agree_after > agree_before
    gen.close()


@pytest.mark.gpu
@pytest.mark.slow
def test_sampling_order_and_throughput(setup) -> None:
    import torch

    from evostar.rollout import get_backend
    from evostar.rollout.hf import generate as hf_generate

    work, init, io, model, train, _ = setup
    k, tokens = 8, 48
    gen = get_backend("vllm", model_dir=init, gpu_memory_utilization=0.25)
    gen(model, io, train[:8], k=k, max_new_tokens=tokens)  # build + warm up
    torch.manual_seed(1)
    t0 = time.perf_counter()
    ours = gen(model, io, train, k=k, temperature=1.0, max_new_tokens=tokens)
    t_vllm = time.perf_counter() - t0
    torch.manual_seed(1)
    again = gen(model, io, train, k=k, temperature=1.0, max_new_tokens=tokens)
    t0 = time.perf_counter()
    hf = hf_generate(model, io, train, k=k, temperature=1.0, max_new_tokens=tokens, batch_size=1024, progress=False)
    torch.cuda.synchronize()
    t_hf = time.perf_counter() - t0
    assert [r.sample_id for r in ours] == [r.sample_id for r in hf]
    assert [r.text for r in ours] == [r.text for r in again]  # per-request seeds: reproducible
    n = len(train) * k
    result = {"sequences": n, "vllm_seq_per_s": n / t_vllm, "hf_seq_per_s": n / t_hf, "speedup": t_hf / t_vllm}
    Path(work / "throughput.json").write_text(json.dumps(result))
    print(f"throughput ({n} sequences of <= {tokens} tokens): {result}")
    gen.close()
