"""End to end: the whole demo pipeline on a tiny gym and a tiny random-init Qwen2-VL.

Runs the real CLI in subprocesses, kills one run with SIGKILL in the middle of the loop and
checks that `--resume` ends with exactly the numbers and weights of an uninterrupted run.
"""

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


# A longer, finely checkpointed warm-up than the smoke preset's, so a kill can land in it.
WARMUP = ["warmup.steps=40", "warmup.eval_every=5"]


def demo_cmd(out: Path, *flags: str) -> list[str]:
    cli = [sys.executable, "-m", "evostar.cli", "demo", "--preset", "smoke", "--out", str(out), "--seed", "3"]
    return [*cli, "--no-progress", *flags, *WARMUP]


def kill_when(cmd: list[str], ready, timeout: float = 300) -> None:
    """Start `cmd` and SIGKILL it as soon as `ready()` is true."""
    child = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and child.poll() is None:
        if ready():
            child.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL, "the run finished before it could be killed"


def warmup_points(run: Path) -> int:
    """Warm-up evaluations checkpointed so far (0 before the first, or once the warm-up is done)."""
    try:
        state = json.loads((run / "checkpoints" / "warmup_progress" / "state.json").read_text())
    except (OSError, ValueError):
        return 0
    return len(state["curve"])


def weights_digest(run: Path) -> str:
    tensors = load_file(run / "checkpoints" / "final" / "model.safetensors")
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].numpy().tobytes())
    return h.hexdigest()


def comparable(summary: dict) -> dict:
    """Everything but timings and paths."""
    drop = {"wall_seconds", "process_seconds", "stage_seconds", "run_dir", "resumed", "model"}
    out = {k: v for k, v in summary.items() if k not in drop}
    out["iterations"] = [{k: v for k, v in it.items() if not k.endswith("seconds")} for it in summary["iterations"]]
    out["warmup"] = {k: v for k, v in summary["warmup"].items() if k != "seconds"}
    if "prm" in out:  # the labelling rate is a timing too
        out["prm"] = {k: v for k, v in summary["prm"].items() if k != "labels_per_second"}
    return out


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> Path:
    """An uninterrupted run, the reference of every killed one."""
    out = tmp_path_factory.mktemp("e2e") / "full"
    proc = subprocess.run(demo_cmd(out), env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_demo_runs_and_resume_after_sigkill_is_exact(full, tmp_path):
    summary = json.loads((full / "summary.json").read_text())

    # The summary has what the issue asks for.
    assert summary["preset"] == "smoke" and summary["seed"] == 3
    for stage in ("base", "warmup", "final"):
        for split in ("test_id", "test_ood"):
            assert 0.0 <= summary["accuracy"][stage][split] <= 1.0
    assert set(summary["stage_seconds"]) >= {"gym", "model", "base_eval", "warmup", "evolve", "final_eval"}
    assert len(summary["iterations"]) == 3
    it = summary["iterations"][0]
    assert it["prompts"] == 17 and it["responses"] == 17 * 4
    assert set(it) >= {"kept", "val_accuracy", "val_pass_at_k", "temperature", "seconds"}
    # The smoke preset runs the full recipe: PRM stages, PRM top-2, the controller before iterations 1 and 3.
    assert [r["adapted"] for r in summary["iterations"]] == [True, False, True]
    assert summary["temperatures"] == [r["temperature"] for r in summary["iterations"]]
    assert set(summary["iterations"][0]["temperature_curve"]) == {"0.6", "0.9", "1.2"}
    assert summary["prm"]["completions"] > 0
    assert (full / "report" / "report.md").is_file() and (full / "report" / "temperature_curves.png").is_file()
    # The run directory holds every stage's outputs.
    assert (full / "config.yaml").exists()
    samples = [json.loads(line) for line in (full / "samples" / "iter_002.jsonl").read_text().splitlines()]
    assert len(samples) == 17 * 4 and {"text", "correct", "steps_correct"} <= set(samples[0])
    stages = [json.loads(line)["stage"] for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert stages.count("warmup_curve") == 8 and {"iter_1", "iter_2", "iter_3", "final"} <= set(stages)
    ckpt = full / "checkpoints" / "iter_3"
    assert {"model.safetensors", "config.json", "trainer.pt", "state.json"} <= {p.name for p in ckpt.iterdir()}
    assert json.loads((ckpt / "state.json").read_text())["cursor"] == 51

    # Kill a second run with SIGKILL once iteration 1 (and the controller's first choice) is on
    # disk, then resume it: the controller's second choice, and everything after, must not change.
    killed = tmp_path / "killed"
    progress = killed / "progress.json"
    kill_when(demo_cmd(killed), lambda: progress.exists() and "iter_1" in progress.read_text())
    assert not (killed / "summary.json").exists()

    resumed = subprocess.run(demo_cmd(killed, "--resume"), env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = json.loads((killed / "summary.json").read_text())
    assert comparable(again) == comparable(summary)
    assert weights_digest(killed) == weights_digest(full)
    # No duplicated metric lines after the resume.
    stages2 = [json.loads(line)["stage"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert sorted(stages2) == sorted(stages)


def test_refuses_to_overwrite_a_run_without_resume(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "progress.json").write_text('{"completed": ["setup"], "results": {}}')
    proc = subprocess.run(demo_cmd(out), env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--resume" in proc.stderr and "Traceback" not in proc.stderr


def test_warmup_killed_at_random_points_resumes_from_its_checkpoints(full, tmp_path):
    """SIGKILL twice at random points of the warm-up (between or during its checkpoint writes),
    resume each time: the resumed warm-up starts from its last checkpoint, not from step 0, and the
    run ends with the summary and weights of an uninterrupted one."""
    rng = random.Random()
    first, second = sorted(rng.sample(range(1, 8), 2))
    delays = [rng.uniform(0, 0.3) for _ in range(2)]
    print(f"kill after {first} and {second} warm-up checkpoints, +{delays[0]:.2f} s / +{delays[1]:.2f} s")
    killed = tmp_path / "killed"

    def after(n: int, delay: float):
        seen: list[float] = []

        def ready() -> bool:
            if warmup_points(killed) >= n and not seen:
                seen.append(time.time())
            return bool(seen) and time.time() >= seen[0] + delay

        return ready

    kill_when(demo_cmd(killed), after(first, delays[0]))
    assert warmup_points(killed) >= first  # what the resume starts from
    kill_when(demo_cmd(killed, "--resume"), after(second, delays[1]))
    assert warmup_points(killed) >= second
    resumed = subprocess.run(demo_cmd(killed, "--resume"), env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert comparable(json.loads((killed / "summary.json").read_text())) == comparable(
        json.loads((full / "summary.json").read_text())
    )
    assert weights_digest(killed) == weights_digest(full)
    assert not (killed / "checkpoints" / "warmup_progress").exists()
    lines = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    full_lines = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    curve = [m["step"] for m in lines if m["stage"] == "warmup_curve"]
    assert curve == [m["step"] for m in full_lines if m["stage"] == "warmup_curve"] == list(range(5, 45, 5))
