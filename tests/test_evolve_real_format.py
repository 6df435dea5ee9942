"""`evostar evolve` on hand-written MathV360K-format data the gym did not produce.

The files are what a user would bring: a JSON list of ``{id, image, conversations}`` records
with relative image paths, answers only in the gpt turn (multiple choice only inside the
question text, no ``choices`` field), no ``gym`` ground truth. A tiny Qwen2-VL gets a tokenizer
trained on those texts; the real CLI runs warm-up plus two self-evolving iterations in a
subprocess, and `evostar eval` scores the final checkpoint. The GPU recipes in ``recipes/`` are
checked here too: every key must be a real config key.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image, ImageDraw

from evostar.config import load_config
from evostar.models.tiny import TinyModelSpec, build_tiny_qwen2_vl

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")


def _draw(n_dots: int, n_squares: int, rng: np.random.Generator) -> Image.Image:
    """Black dots and blue squares on a white 56x28 canvas, in separate cells (no overlaps)."""
    img = Image.new("RGB", (56, 28), "white")
    draw = ImageDraw.Draw(img)
    cells = rng.permutation(8)[: n_dots + n_squares]
    for j, cell in enumerate(cells):
        x, y = 7 * (cell % 4) * 2 + 7, 14 * (cell // 4) + 7
        if j < n_dots:
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill="black")
        else:
            draw.rectangle((x - 3, y - 3, x + 3, y + 3), fill="blue")
    return img


def _records(root: Path, split: str, n: int, seed: int, with_cot: bool) -> list[dict]:
    """Counting questions (integer answers) and, every third one, a multiple-choice comparison."""
    rng = np.random.default_rng(seed)
    (root / "imgs").mkdir(exist_ok=True)
    out = []
    for i in range(n):
        dots, squares = (int(v) for v in rng.integers(1, 4, size=2))
        rel = f"imgs/{split}_{i}.png"
        _draw(dots, squares, rng).save(root / rel)
        kind = i % 3
        if kind == 2:
            question = "Are there more dots than squares?\nChoices:\n(A) yes\n(B) no"
            answer = "A" if dots > squares else "B"
            steps = f"There are {dots} dots.\n\nThere are {squares} squares."
        else:
            shape, count = ("dots", dots) if kind == 0 else ("squares", squares)
            question = f"How many {shape} are there?"
            answer = str(count)
            steps = f"I count the {shape}.\n\nThere are {count} {shape}."
        gpt = f"{steps}\n\n# Answer\n\n{answer}" if with_cot else answer
        out.append(
            {
                "id": f"{split}-{i:03d}",
                "image": rel,
                "conversations": [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": gpt}],
            }
        )
    (root / f"{split}.json").write_text(json.dumps(out, indent=1))
    return out


@pytest.mark.slow
def test_evolve_cli_on_real_format_data(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    splits = {
        "train": _records(data, "train", 24, seed=1, with_cot=False),
        "seed": _records(data, "seed", 12, seed=2, with_cot=True),
        "val": _records(data, "val", 6, seed=3, with_cot=False),
        "test": _records(data, "test", 6, seed=4, with_cot=False),
    }
    texts = ["user\nassistant\n", "# Answer\n\n"] + [
        turn["value"].replace("<image>\n", "") for recs in splits.values() for r in recs for turn in r["conversations"]
    ]
    model_dir = build_tiny_qwen2_vl(
        texts, tmp_path / "model", TinyModelSpec(vocab_size=384, num_layers=2, hidden_size=64, intermediate_size=256)
    )
    run = tmp_path / "run"
    cfg = {
        "output_dir": str(run),
        "seed": 0,
        "threads": 1,
        "device": "cpu",
        "progress": False,
        "model": {"path": str(model_dir)},
        "data": {
            "train": str(data / "train.json"),
            "val": str(data / "val.json"),
            "test": {"test": str(data / "test.json")},
            "seed_cot": str(data / "seed.json"),
        },
        "gen": {"k": 2, "temperature": 1.0, "max_new_tokens": 20, "batch_size": 64, "eval_batch_size": 64},
        "warmup": {"steps": 80, "eval_every": 40, "optim": {"lr": 3e-3, "batch_size": 12, "schedule": "constant"}},
        "evolve": {
            "iterations": 2,
            "interval": 0.5,
            "mode": "continuous",
            "steps_per_iteration": 2,
            "selection": "all",
            "optim": {"lr": 3e-4, "batch_size": 8, "schedule": "constant"},
        },
        "eval": {"pass_k": 2, "pass_temperature": 1.0},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))

    proc = subprocess.run(
        # the override also checks that the CLI takes the wsd schedule the trainer has
        [
            sys.executable,
            "-m",
            "evostar.cli",
            "evolve",
            "--config",
            str(tmp_path / "cfg.yaml"),
            "warmup.optim.schedule=wsd",
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    # summary.json: every stage's accuracy on the test split, and one record per iteration.
    summary = json.loads((run / "summary.json").read_text())
    assert summary["mode"] == "continuous" and summary["seed"] == 0 and summary["model"] == str(model_dir)
    for stage in ("base", "warmup", "final"):
        assert 0.0 <= summary["accuracy"][stage]["test"] <= 1.0
    assert set(summary["stage_seconds"]) >= {"base_eval", "warmup", "evolve", "final_eval"}
    assert summary["warmup"]["best_step"] in (40, 80) and len(summary["warmup"]["curve"]) == 2
    first, last = summary["warmup"]["curve"]
    assert first["lr"] == pytest.approx(3e-3) and last["lr"] < first["lr"] / 5  # wsd: held, then decayed
    its = summary["iterations"]
    assert [it["iteration"] for it in its] == [1, 2]
    for it in its:
        assert it["prompts"] == 12 and it["responses"] == 24 and 0 <= it["kept"] <= 24
        assert 0.0 <= it["val_accuracy"] <= 1.0 and 0.0 <= it["val_pass_at_k"] <= 1.0
        assert it["kept_steps_all_correct"] is None  # no gym ground truth in real data
    assert summary["steps_all_correct"]["final"]["test"] is None
    assert sum(it["kept"] for it in its) > 0, its  # the warm-up taught the format: something was kept

    # Run directory layout.
    assert (run / "config.yaml").is_file() and (run / "metrics.jsonl").is_file() and (run / "progress.json").is_file()
    samples = [json.loads(line) for line in (run / "samples" / "iter_001.jsonl").read_text().splitlines()]
    assert len(samples) == 24 and {s["sample_id"] for s in samples} <= {r["id"] for r in splits["train"]}
    assert all(s["correct"] in (True, False) and s["steps_correct"] is None for s in samples)
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["iter_001.jsonl", "iter_002.jsonl"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["final", "iter_2", "warmup"]
    final = run / "checkpoints" / "final"
    assert (final / "config.json").is_file() and (final / "model.safetensors").is_file()
    stages = {json.loads(line)["stage"] for line in (run / "metrics.jsonl").read_text().splitlines()}
    assert {"base", "warmup", "iter_1", "iter_2", "final"} <= stages

    # `evostar eval` on the final checkpoint prints accuracy JSON.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "evostar.cli",
            "eval",
            "--model",
            str(final),
            "--data",
            str(data / "test.json"),
            "--max-new-tokens",
            "20",
            "--responses",
            str(tmp_path / "responses.jsonl"),
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout[proc.stdout.index("{") :])
    metrics = result[str(data / "test.json")]
    assert metrics["n"] == 6 and 0.0 <= metrics["accuracy"] <= 1.0
    assert metrics["accuracy"] == pytest.approx(summary["accuracy"]["final"]["test"])  # same greedy decode
    assert len((tmp_path / "responses.jsonl").read_text().splitlines()) == 6


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_recipes_load_with_real_keys(recipe):
    """`load_config` raises on unknown keys, so a recipe that loads has only real ones."""
    cfg = load_config(recipe)
    header = recipe.read_text().split("\n\n", 1)[0]
    assert "ESTIMATE" in header and "NOT RUN" in header  # memory figures are not measurements
    assert "evostar" in header and "data/" in header  # launch command and data layout
    assert cfg.model.path and cfg.data.train and cfg.data.val and cfg.data.test
    assert cfg.gen.backend == "vllm" and cfg.gen.k == 16 and cfg.gen.temperature == 1.0
    assert cfg.evolve.mode == "continuous" and cfg.evolve.interval == 0.25
    assert cfg.evolve.selection == "all" and cfg.evolve.optim.schedule == "constant"
    assert cfg.evolve.optim.batch_size == 128 and cfg.model.gradient_checkpointing
    if cfg.model.lora_r == 0:
        assert cfg.evolve.optim.lr == 1e-6 and cfg.model.dtype == "float32"  # fp32 master weights
    for launcher in re.findall(r"--config_file (\S+)", header):
        assert (recipe.parents[1] / launcher).is_file(), launcher


def test_recipe_set():
    assert {p.name for p in RECIPES} >= {"qwen2vl_2b_mathv360k_1gpu.yaml", "qwen2vl_7b_mathv360k_fsdp_8gpu.yaml"}
