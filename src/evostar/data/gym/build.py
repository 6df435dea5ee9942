"""Write the gym's splits to disk in the same MathV360K-style format as real data, so every
later stage reads gym and real data through one loader."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from evostar.records import STEP_SEPARATOR, format_response

from .tasks import DEFAULT_FAMILIES, Problem, generate_problems, gold_answer, gold_choices, gold_steps, question_text

SPLITS: dict[str, tuple[int, str, str, bool]] = {
    # split: (rng stream, digit/bar pool, style, with gold chain of thought)
    "seed": (0, "train", "id", True),
    "train": (1, "train", "id", False),
    "val": (2, "eval", "id", False),
    "test_id": (3, "eval", "id", False),
    "test_ood": (4, "eval", "ood", False),
    # a second training pool for pseudo-labelling (data.unlabeled); its answers are kept in the
    # file, for the oracle mode and for measuring pseudo-label accuracy, and hidden from the votes
    "unlabeled": (5, "train", "id", False),
}
"""Each split draws from its own rng stream, so changing one split's size leaves the others
unchanged."""
IMAGE_DIR = "images"


def problem_record(problem: Problem, image_rel: str, *, with_rationale: bool) -> dict[str, Any]:
    """A MathV360K-style record (plus ``choices`` and the ``gym`` ground truth)."""
    gym = problem.gym
    answer = gold_answer(gym)
    gpt = format_response(STEP_SEPARATOR.join(gold_steps(gym)), answer) if with_rationale else answer
    record: dict[str, Any] = {
        "id": problem.id,
        "image": image_rel,
        "conversations": [{"from": "human", "value": f"<image>\n{question_text(gym)}"}, {"from": "gpt", "value": gpt}],
    }
    choices = gold_choices(gym)
    if choices is not None:
        record["choices"] = choices
    record["gym"] = gym
    return record


def dump_records(records: list[dict[str, Any]]) -> str:
    """A JSON list with one record per line: valid JSON, diff- and grep-friendly."""
    lines = ",\n".join(json.dumps(r, ensure_ascii=False) for r in records)
    return f"[\n{lines}\n]\n" if records else "[]\n"


def build_gym(
    out_dir: str | Path,
    *,
    seed: int,
    n_seed: int = 200,
    n_train: int = 4000,
    n_val: int = 250,
    n_test_id: int = 500,
    n_test_ood: int = 500,
    n_unlabeled: int = 0,
    families: Sequence[tuple[str, float]] = DEFAULT_FAMILIES,
    ood_style_strength: float = 1.0,
) -> dict[str, Path]:
    """Generate all splits deterministically from ``seed`` and write them under ``out_dir``.

    Writes ``out_dir/images/<id>.png`` and ``out_dir/<split>.json``; returns split -> json path.
    seed/train use the train pool of digit images and bar-height triples, val/test the eval
    pool; test_ood is drawn in the shifted style.
    """
    out = Path(out_dir)
    (out / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    sizes = {
        "seed": n_seed,
        "train": n_train,
        "val": n_val,
        "test_id": n_test_id,
        "test_ood": n_test_ood,
        "unlabeled": n_unlabeled,
    }
    paths: dict[str, Path] = {}
    for split, (stream, pool, style, with_rationale) in SPLITS.items():
        n = sizes[split]
        if n < 0:
            raise ValueError(f"n_{split} must be >= 0, got {n}")
        if split == "unlabeled" and n == 0:
            continue  # no file: most runs have no unlabeled pool
        rng = np.random.default_rng([int(seed), stream])
        problems = generate_problems(
            n,
            rng=rng,
            pool=pool,
            style=style,
            families=families,
            ood_style_strength=ood_style_strength,
            id_prefix=f"gym-{split}",
        )
        records = []
        for p in problems:
            image_rel = f"{IMAGE_DIR}/{p.id}.png"
            p.image.save(out / image_rel, format="PNG", compress_level=1)
            records.append(problem_record(p, image_rel, with_rationale=with_rationale))
        path = out / f"{split}.json"
        path.write_text(dump_records(records), encoding="utf-8")
        paths[split] = path
    return paths
