"""The CPU rollout pool: bf16 weights shared with worker processes, pushed on every call,
seeded shards, and workers that never outlive their run."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from evostar.data.gym import build_gym
from evostar.data.loaders import load_samples
from evostar.models.hub import load_model, load_processor
from evostar.models.inputs import VLMInputs
from evostar.models.tiny import build_tiny_qwen2_vl
from evostar.records import Sample
from evostar.rollout.hf import generate
from evostar.rollout.pool import RolloutPool

GEN = dict(k=3, temperature=1.0, top_p=1.0, max_new_tokens=10, batch_size=12, iteration=1)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Sample]]:
    out = tmp_path_factory.mktemp("pool")
    paths = build_gym(out / "gym", seed=0, n_seed=8, n_train=7, n_val=0, n_test_id=0, n_test_ood=0)
    seed = load_samples(paths["seed"])
    texts = [t for s in seed for t in (s.question, s.target)]
    return build_tiny_qwen2_vl(texts, out / "model"), load_samples(paths["train"])


def _bf16(model: torch.nn.Module, tmp: Path) -> torch.nn.Module:
    """`model` as `from_pretrained(dtype=bfloat16)` loads it."""
    model.save_pretrained(tmp)
    return load_model(tmp, dtype=torch.bfloat16)


def _expected(model: torch.nn.Module, io: VLMInputs, samples: list[Sample], seed: int, tmp: Path) -> list[str]:
    """What a one-process pool must return: the bf16 model sampled with the seed it draws."""
    bf16 = _bf16(model, tmp)
    torch.manual_seed(seed)
    shard_seed = torch.randint(0, 2**62, (1,)).tolist()[0]
    torch.manual_seed(shard_seed)
    return [r.text for r in generate(bf16, io, samples, progress=False, **GEN)]


def test_one_process_pool_samples_the_pushed_bf16_weights(setup, tmp_path):
    model_dir, samples = setup
    model = load_model(model_dir)
    io = VLMInputs(load_processor(model_dir))
    pool = RolloutPool(model_dir, workers=1, dtype="bfloat16")
    torch.manual_seed(5)
    first = pool(model, io, samples, progress=False, **GEN)
    assert [r.text for r in first] == _expected(model, io, samples, 5, tmp_path / "a")
    assert [r.sample_id for r in first] == [s.id for s in samples for _ in range(GEN["k"])]
    # New weights reach the sampler on the next call (the push), without rebuilding it.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.manual_seed(5)
    second = pool(model, io, samples, progress=False, **GEN)
    assert [r.text for r in second] == _expected(model, io, samples, 5, tmp_path / "b")
    assert [r.text for r in second] != [r.text for r in first]
    pool.close()


def test_two_process_pool_is_seeded_and_keeps_sample_order(setup, tmp_path):
    model_dir, samples = setup
    model = load_model(model_dir)
    io = VLMInputs(load_processor(model_dir))
    pool = RolloutPool(model_dir, workers=2, dtype="bfloat16")
    try:
        runs = []
        for _ in range(2):
            torch.manual_seed(11)
            runs.append(pool(model, io, samples, progress=False, **GEN))
        assert [r.text for r in runs[0]] == [r.text for r in runs[1]]
        assert [r.sample_id for r in runs[0]] == [s.id for s in samples for _ in range(GEN["k"])]
        assert all(r.iteration == 1 and r.temperature == 1.0 for r in runs[0])
        # The worker's shard (samples 4..6 of 7) is what one thread samples with the second seed.
        torch.manual_seed(11)
        seeds = torch.randint(0, 2**62, (2,)).tolist()
        bf16 = _bf16(model, tmp_path / "bf16")
        torch.manual_seed(seeds[1])
        tail = generate(bf16, io, samples[4:], progress=False, **GEN)
        assert [r.text for r in runs[0][4 * GEN["k"] :]] == [r.text for r in tail]
        (proc,) = pool.processes
        assert proc.is_alive()
    finally:
        pool.close()
    assert not proc.is_alive()


def test_workers_exit_when_their_run_is_killed(setup, tmp_path):
    model_dir, samples = setup
    script = tmp_path / "run.py"
    script.write_text(
        textwrap.dedent(f"""
        import sys, time, torch
        from evostar.data.loaders import load_samples
        from evostar.models.hub import load_model, load_processor
        from evostar.models.inputs import VLMInputs
        from evostar.rollout.pool import RolloutPool
        if __name__ == "__main__":
            model = load_model({str(model_dir)!r})
            io = VLMInputs(load_processor({str(model_dir)!r}))
            pool = RolloutPool({str(model_dir)!r}, workers=2)
            pool(model, io, load_samples(sys.argv[1]), k=1)
            print(pool.processes[0].pid, flush=True)
            time.sleep(600)
    """)
    )
    train = Path(samples[0].image).parent.parent / "train.json"
    proc = subprocess.Popen([sys.executable, str(script), str(train)], stdout=subprocess.PIPE, text=True)
    worker = int(proc.stdout.readline())
    assert _running(worker)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.time() + 15
    while time.time() < deadline:
        if not _running(worker):
            return
        time.sleep(0.2)
    pytest.fail(f"rollout worker {worker} outlived its killed run")


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_a_worker_that_dies_is_an_error_not_a_hang(setup, tmp_path):
    """A script without a main guard makes the spawned worker re-run it and die (it may not start
    processes of its own while bootstrapping): the run must stop and say why."""
    model_dir, samples = setup
    script = tmp_path / "unguarded.py"
    script.write_text(
        textwrap.dedent(f"""
        import sys
        from evostar.data.loaders import load_samples
        from evostar.models.hub import load_model, load_processor
        from evostar.models.inputs import VLMInputs
        from evostar.rollout.pool import RolloutPool
        model = load_model({str(model_dir)!r})
        pool = RolloutPool({str(model_dir)!r}, workers=2)
        pool(model, VLMInputs(load_processor({str(model_dir)!r})), load_samples(sys.argv[1]), k=1)
    """)
    )
    train = Path(samples[0].image).parent.parent / "train.json"
    proc = subprocess.run([sys.executable, str(script), str(train)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "rollout worker" in proc.stderr and "__main__" in proc.stderr, proc.stderr[-2000:]
