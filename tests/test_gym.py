"""The gym: image geometry, train/eval separation, determinism, gold answers and the step
checker (process ground truth)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from evostar.data import load_samples
from evostar.data.gym import (
    COMPARE_CHOICES,
    BarStyle,
    DigitStyle,
    bar_pools,
    build_gym,
    check_steps,
    digit_label,
    digit_pools,
    family_counts,
    generate_problems,
    gold_answer,
    gold_choices,
    gold_steps,
    pool_of,
    question_text,
    render_bars,
    render_digits,
)
from evostar.records import STEP_SEPARATOR, Sample, format_response

SIZES = dict(n_seed=60, n_train=300, n_val=60, n_test_id=120, n_test_ood=120)


@pytest.fixture(scope="module")
def gym_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gym")
    build_gym(out, seed=7, **SIZES)
    return out


def _records(gym_dir: Path, split: str) -> list[dict[str, Any]]:
    return json.loads((gym_dir / f"{split}.json").read_text())


def _sample(family: str, template: str, **truth: list[int]) -> Sample:
    gym = {"family": family, "template": template, "truth": truth, "style": "id"}
    return Sample(
        id="t",
        question=question_text(gym),
        answer=gold_answer(gym),
        rationale=STEP_SEPARATOR.join(gold_steps(gym)),
        choices=gold_choices(gym),
        meta={"gym": gym},
    )


def _response(*steps: str, answer: str) -> str:
    return format_response(STEP_SEPARATOR.join(steps), answer)


# ----------------------------------------------------------------------------- images


def test_every_image_is_84x28_rgb(gym_dir: Path) -> None:
    files = sorted((gym_dir / "images").glob("*.png"))
    assert len(files) == sum(SIZES.values())
    for f in files:
        with Image.open(f) as im:
            assert im.size == (84, 28) and im.mode == "RGB", f


def test_digit_strip_is_dark_ink_on_white() -> None:
    ids = [int(digit_pools()["train"][d][0]) for d in (1, 5, 8)]
    arr = np.asarray(render_digits(ids))
    assert arr.shape == (28, 84, 3)
    assert (arr[..., 0] == arr[..., 1]).all()  # grayscale stored as RGB
    assert arr.min() < 40  # dark strokes
    assert np.median(arr) > 200  # mostly white paper


def test_bar_heights_are_three_pixels_per_unit() -> None:
    heights = [1, 5, 9]
    arr = np.asarray(render_bars(heights))
    for k, h in enumerate(heights):
        column = arr[:, 28 * k + 14, 0]
        assert (column != 255).sum() == 3 * h  # bar rows, the bottom one is the baseline
    ood = BarStyle.ood(1.0)
    arr = np.asarray(render_bars(heights, ood))
    for k, h in enumerate(heights):
        column = arr[:, 28 * k + 14]
        assert (column == ood.bar_rgb).all(axis=1).sum() == 3 * h - 1
    with pytest.raises(ValueError):
        render_bars([0, 3, 4])


def test_ood_style_strength_zero_is_the_default_style() -> None:
    ids = [int(digit_pools()["eval"][d][0]) for d in (2, 3, 4)]
    rng = np.random.default_rng(0)
    plain = np.asarray(render_digits(ids))
    assert DigitStyle.ood(0.0) == DigitStyle() and BarStyle.ood(0.0) == BarStyle()
    shifted = np.asarray(render_digits(ids, DigitStyle.ood(1.0), rng))
    assert shifted.shape == plain.shape and not np.array_equal(plain, shifted)
    assert shifted.min() > 0  # lighter ink, no pure black strokes
    assert np.median(shifted) > 180  # still a light background: solvable


# ----------------------------------------------------------------------------- splits


def test_digit_pools_are_a_stratified_80_20_split() -> None:
    pools = digit_pools()
    total = 0
    for label in range(10):
        train, evals = set(pools["train"][label]), set(pools["eval"][label])
        assert not train & evals
        n = len(train) + len(evals)
        total += n
        assert abs(len(evals) - 0.2 * n) <= 1
        assert all(digit_label(i) == label for i in train | evals)
    assert total == 1797


def test_eval_handwriting_and_charts_never_appear_in_training(gym_dir: Path) -> None:
    used: dict[str, set[int]] = {}
    triples: dict[str, set[tuple[int, ...]]] = {}
    for split in ("seed", "train", "val", "test_id", "test_ood"):
        for r in _records(gym_dir, split):
            gym = r["gym"]
            if "digit_ids" in gym:
                used.setdefault(split, set()).update(gym["digit_ids"])
                assert [digit_label(i) for i in gym["digit_ids"]] == gym["truth"]["digits"]
            else:
                triples.setdefault(split, set()).add(tuple(gym["truth"]["heights"]))
    train_ids = used["seed"] | used["train"]
    eval_ids = used["val"] | used["test_id"] | used["test_ood"]
    assert not train_ids & eval_ids
    assert {pool_of(i) for i in train_ids} == {"train"}
    assert {pool_of(i) for i in eval_ids} == {"eval"}
    train_triples = triples["seed"] | triples["train"]
    eval_triples = triples["val"] | triples["test_id"] | triples["test_ood"]
    assert not train_triples & eval_triples
    assert not set(bar_pools()["train"]) & set(bar_pools()["eval"])


def test_split_contents(gym_dir: Path) -> None:
    seed = load_samples(gym_dir / "seed.json")
    assert all(s.rationale for s in seed)
    for split in ("train", "val", "test_id", "test_ood"):
        samples = load_samples(gym_dir / f"{split}.json")
        assert len(samples) == SIZES[f"n_{split}"]
        assert all(s.rationale is None and s.answer for s in samples)
        style = "ood" if split == "test_ood" else "id"
        assert {s.meta["gym"]["style"] for s in samples} == {style}
    families = [s.meta["gym"]["family"] for s in seed]
    assert {f: families.count(f) for f in set(families)} == {"arith": 36, "compare": 12, "bars": 12}
    templates = {(s.meta["gym"]["family"], s.meta["gym"]["template"]) for s in seed}
    assert len(templates) == 7


def test_same_seed_same_bytes_other_seed_other_data(tmp_path: Path) -> None:
    small = dict(n_seed=10, n_train=20, n_val=5, n_test_id=5, n_test_ood=10)
    a = build_gym(tmp_path / "a", seed=3, **small)
    b = build_gym(tmp_path / "b", seed=3, **small)
    c = build_gym(tmp_path / "c", seed=4, **small)
    for split in a:
        assert a[split].read_bytes() == b[split].read_bytes()
        assert a[split].read_bytes() != c[split].read_bytes()

    def digest(root: Path) -> str:
        h = hashlib.sha256()
        for f in sorted((root / "images").glob("*.png")):
            h.update(f.name.encode() + f.read_bytes())
        return h.hexdigest()

    assert digest(tmp_path / "a") == digest(tmp_path / "b")


def test_split_streams_are_independent_of_other_sizes(tmp_path: Path) -> None:
    a = build_gym(tmp_path / "a", seed=1, n_seed=5, n_train=10, n_val=5, n_test_id=5, n_test_ood=5)
    b = build_gym(tmp_path / "b", seed=1, n_seed=5, n_train=30, n_val=5, n_test_id=5, n_test_ood=5)
    assert a["test_id"].read_bytes() == b["test_id"].read_bytes()


def test_family_mix_and_validation() -> None:
    assert family_counts(10, [("arith", 0.6), ("compare", 0.2), ("bars", 0.2)]) == {"arith": 6, "compare": 2, "bars": 2}
    assert sum(family_counts(7, [("arith", 1), ("bars", 1), ("compare", 1)]).values()) == 7
    with pytest.raises(ValueError, match="unknown gym families"):
        family_counts(5, [("geometry", 1.0)])
    rng = np.random.default_rng(0)
    problems = generate_problems(20, rng=rng, families=[("bars", 1.0)])
    assert {p.gym["family"] for p in problems} == {"bars"}


def test_build_is_fast(tmp_path: Path) -> None:
    generate_problems(1, rng=np.random.default_rng(0))  # load the digits outside the clock
    start = time.perf_counter()
    build_gym(tmp_path, seed=0, n_seed=100, n_train=400, n_val=100, n_test_id=100, n_test_ood=300)
    assert time.perf_counter() - start < 10.0  # ~1 s unloaded; generous for shared CPUs


# ----------------------------------------------------------------------------- gold answers


def test_question_and_gold_forms() -> None:
    s = _sample("arith", "(a+b)*c", digits=[3, 7, 5])
    assert s.question == ("The image shows three handwritten digits a, b, c from left to right. Compute (a + b) * c.")
    assert gold_steps(s.meta["gym"]) == [
        "The first digit is 3.",
        "The second digit is 7.",
        "The third digit is 5.",
        "3 + 7 = 10.",
        "10 * 5 = 50.",
    ]
    assert s.answer == "50"
    assert s.target == STEP_SEPARATOR.join(gold_steps(s.meta["gym"])) + "\n\n# Answer\n\n50"

    c = _sample("compare", "largest", digits=[2, 7, 5])
    assert c.question.endswith(
        "Which digit is the largest?\nChoices:\n(A) the first digit\n(B) the second digit\n(C) the third digit"
    )
    assert c.choices == COMPARE_CHOICES and c.answer == "B"
    assert gold_steps(c.meta["gym"])[-1] == "The largest is 7, the second digit."
    assert _sample("compare", "smallest", digits=[2, 7, 5]).answer == "A"

    b = _sample("bars", "total", heights=[4, 2, 5])
    assert gold_steps(b.meta["gym"]) == [
        "Bar 1 has height 4.",
        "Bar 2 has height 2.",
        "Bar 3 has height 5.",
        "4 + 2 = 6.",
        "6 + 5 = 11.",
    ]
    r = _sample("bars", "range", heights=[2, 9, 4])
    assert gold_steps(r.meta["gym"])[-1] == "9 - 2 = 7." and r.answer == "7"


def test_every_generated_gold_rationale_checks_all_true(gym_dir: Path) -> None:
    for split in ("seed", "train", "val", "test_id", "test_ood"):
        for s in load_samples(gym_dir / f"{split}.json"):
            gym = s.meta["gym"]
            assert s.answer == gold_answer(gym)
            target = s.target if split == "seed" else _response(*gold_steps(gym), answer=s.answer)
            verdict = check_steps(s, target)
            assert verdict and all(verdict), (s.id, target, verdict)


# ----------------------------------------------------------------------------- step checker


def test_wrong_arithmetic_right_answer() -> None:
    s = _sample("arith", "a*b+c", digits=[7, 8, 8])
    text = _response(
        "The first digit is 7.",
        "The second digit is 8.",
        "The third digit is 8.",
        "7 * 8 = 56.",
        "86 + 8 = 70.",
        answer="64",
    )
    assert text.endswith("# Answer\n\n64") and s.answer == "64"
    assert check_steps(s, text) == [True, True, True, True, False]


def test_misread_digit_makes_consistent_arithmetic_wrong() -> None:
    s = _sample("arith", "(a+b)*c", digits=[3, 7, 5])
    text = _response(
        "The first digit is 3.",
        "The second digit is 1.",
        "The third digit is 5.",
        "3 + 1 = 4.",
        "4 * 5 = 20.",
        answer="20",
    )
    assert check_steps(s, text) == [True, False, True, False, False]


def test_swapped_operands_and_lenient_forms() -> None:
    s = _sample("arith", "(a+b)*c", digits=[3, 7, 5])
    assert check_steps(s, _response("7 + 3 = 10.", "5 * 10 = 50.", answer="50")) == [True, True]
    assert check_steps(s, _response("3+7=10", "10 × 5 = 50.", answer="50")) == [True, True]
    # right arithmetic, but not an operation of this problem
    assert check_steps(s, _response("3 * 7 = 21.", "10 + 5 = 15.", answer="50")) == [False, False]
    r = _sample("bars", "range", heights=[2, 9, 4])
    assert check_steps(r, _response("9 - 2 = 7.", "2 - 9 = -7.", "9 - 4 = 5.", answer="7")) == [True, False, False]


def test_compare_misread_but_right_letter() -> None:
    s = _sample("compare", "largest", digits=[2, 7, 5])
    text = _response(
        "The first digit is 2.",
        "The second digit is 9.",
        "The third digit is 5.",
        "The largest is 9, the second digit.",
        answer="B",
    )
    assert s.answer == "B"
    assert check_steps(s, text) == [True, False, True, False]
    assert check_steps(s, _response("The largest is 7, the third digit.", answer="C")) == [False]
    assert check_steps(s, _response("The smallest is 2, the first digit.", answer="A")) == [False]
    assert check_steps(s, _response("The largest is 7, the second digit.", answer="B")) == [True]


def test_bar_readings_and_unparseable_steps() -> None:
    s = _sample("bars", "total", heights=[4, 2, 5])
    text = _response(
        "Bar 1 has height 4.",
        "Bar 2 has height 3.",
        "Bar 4 has height 5.",
        "The first digit is 4.",
        "Let me add them up.",
        "4 + 2 = 6.",
        "6 + 5 = 11.",
        answer="11",
    )
    assert check_steps(s, text) == [True, False, False, False, False, True, True]
    assert check_steps(s, "# Answer\n\n11") == []


def test_checker_rejects_non_gym_samples() -> None:
    with pytest.raises(ValueError, match="not a gym problem"):
        check_steps(Sample(id="x", question="q", answer="1"), "1 + 1 = 2.")
