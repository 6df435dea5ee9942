"""Task families of the gym: what is asked, the gold plan, the gold chain of thought.

Everything about a problem is derived from its small JSON-serialisable ``gym`` dict
(``family``, ``template``, ``truth`` ...), which travels in ``Sample.meta["gym"]``: the
question, the gold steps and the step checker all read the same ground truth, so they cannot
drift apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from itertools import product
from typing import Any

import numpy as np
from PIL import Image

from evostar.records import STEP_SEPARATOR, Sample

from .render import MAX_BAR_HEIGHT, POOL_SEED, BarStyle, DigitStyle, digit_pools, render_bars, render_digits

TEMPLATES: dict[str, tuple[str, ...]] = {
    "arith": ("a+b+c", "(a+b)*c", "a*b+c"),
    "compare": ("largest", "smallest"),
    "bars": ("total", "range"),
}
"""Family -> its question templates (drawn uniformly within a family)."""
DEFAULT_FAMILIES: tuple[tuple[str, float], ...] = (("arith", 0.6), ("compare", 0.2), ("bars", 0.2))
ORDINALS = ("first", "second", "third")
LETTERS = "ABC"
COMPARE_CHOICES = ["the first digit", "the second digit", "the third digit"]

_ARITH_EXPR = {"a+b+c": "a + b + c", "(a+b)*c": "(a + b) * c", "a*b+c": "a * b + c"}
_DIGITS_INTRO = "The image shows three handwritten digits"
_BARS_INTRO = "The image shows a bar chart with three bars."

Op = tuple[int, str, int, int]
"""One arithmetic step ``(x, op, y, result)``."""


# ----------------------------------------------------------------------------- gold derivations


def _truth(gym: dict[str, Any], key: str) -> list[int]:
    return [int(v) for v in gym["truth"][key]]


def question_text(gym: dict[str, Any]) -> str:
    """The question shown with the image (choices included for multiple choice)."""
    family, template = gym["family"], gym["template"]
    if family == "arith":
        return f"{_DIGITS_INTRO} a, b, c from left to right. Compute {_ARITH_EXPR[template]}."
    if family == "compare":
        options = "\n".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(COMPARE_CHOICES))
        return f"{_DIGITS_INTRO} from left to right. Which digit is the {template}?\nChoices:\n{options}"
    if family == "bars":
        if template == "total":
            return f"{_BARS_INTRO} What is the total height of the three bars?"
        return f"{_BARS_INTRO} How much taller is the tallest bar than the shortest?"
    raise ValueError(f"unknown gym family {family!r}")


def gold_plan(gym: dict[str, Any]) -> list[Op]:
    """The arithmetic steps of the gold solution, on the true values."""
    family, template = gym["family"], gym["template"]
    if family == "arith":
        a, b, c = _truth(gym, "digits")
        if template == "a+b+c":
            return [(a, "+", b, a + b), (a + b, "+", c, a + b + c)]
        if template == "(a+b)*c":
            return [(a, "+", b, a + b), (a + b, "*", c, (a + b) * c)]
        if template == "a*b+c":
            return [(a, "*", b, a * b), (a * b, "+", c, a * b + c)]
    elif family == "bars":
        h = _truth(gym, "heights")
        if template == "total":
            return [(h[0], "+", h[1], h[0] + h[1]), (h[0] + h[1], "+", h[2], sum(h))]
        if template == "range":
            return [(max(h), "-", min(h), max(h) - min(h))]
    elif family == "compare":
        return []
    raise ValueError(f"unknown gym problem {family!r}/{template!r}")


def compare_target(gym: dict[str, Any]) -> tuple[int, int]:
    """(value, position) of the digit a compare question asks for."""
    digits = _truth(gym, "digits")
    pick = max if gym["template"] == "largest" else min
    value = pick(digits)
    return value, digits.index(value)


def gold_steps(gym: dict[str, Any]) -> list[str]:
    """The gold chain of thought, one string per step."""
    family = gym["family"]
    if family in ("arith", "compare"):
        steps = [f"The {ORDINALS[i]} digit is {d}." for i, d in enumerate(_truth(gym, "digits"))]
    else:
        steps = [f"Bar {k + 1} has height {h}." for k, h in enumerate(_truth(gym, "heights"))]
    if family == "compare":
        value, pos = compare_target(gym)
        steps.append(f"The {gym['template']} is {value}, the {ORDINALS[pos]} digit.")
    steps += [f"{x} {op} {y} = {z}." for x, op, y, z in gold_plan(gym)]
    return steps


def gold_answer(gym: dict[str, Any]) -> str:
    """The gold final answer: a number, or the option letter for multiple choice."""
    if gym["family"] == "compare":
        return LETTERS[compare_target(gym)[1]]
    return str(gold_plan(gym)[-1][3])


def gold_choices(gym: dict[str, Any]) -> list[str] | None:
    return list(COMPARE_CHOICES) if gym["family"] == "compare" else None


# ----------------------------------------------------------------------------- generation


@lru_cache(maxsize=1)
def bar_pools() -> dict[str, list[tuple[int, int, int]]]:
    """80/20 split of all 9^3 bar-height triples (fixed seed): like the digit images, eval
    charts are never drawn in training (id-style bar charts are a pure function of heights)."""
    triples = list(product(range(1, MAX_BAR_HEIGHT + 1), repeat=3))
    order = np.random.default_rng(POOL_SEED + 1).permutation(len(triples))
    n_eval = int(round(0.2 * len(triples)))
    eval_set = sorted(triples[i] for i in order[:n_eval])
    train_set = sorted(triples[i] for i in order[n_eval:])
    return {"train": train_set, "eval": eval_set}


@dataclass
class Problem:
    """A generated problem before it is written to disk."""

    id: str
    gym: dict[str, Any]
    image: Image.Image

    def to_sample(self, image_path: str | None = None, *, with_rationale: bool = True) -> Sample:
        return Sample(
            id=self.id,
            question=question_text(self.gym),
            image=image_path,
            answer=gold_answer(self.gym),
            rationale=STEP_SEPARATOR.join(gold_steps(self.gym)) if with_rationale else None,
            choices=gold_choices(self.gym),
            meta={"gym": self.gym},
        )


def family_counts(n: int, families: Sequence[tuple[str, float]]) -> dict[str, int]:
    """Split ``n`` problems between families by weight (largest remainder, exact total)."""
    names = [f for f, _ in families]
    weights = np.array([float(w) for _, w in families])
    unknown = [f for f in names if f not in TEMPLATES]
    if unknown:
        raise ValueError(f"unknown gym families {unknown}; known: {sorted(TEMPLATES)}")
    if len(set(names)) != len(names) or (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"families must be distinct with non-negative weights, got {families}")
    raw = n * weights / weights.sum()
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    return {f: int(c) for f, c in zip(names, counts, strict=True)}


def generate_problems(
    n: int,
    *,
    rng: np.random.Generator,
    pool: str = "train",
    style: str = "id",
    families: Sequence[tuple[str, float]] = DEFAULT_FAMILIES,
    ood_style_strength: float = 1.0,
    id_prefix: str = "gym",
) -> list[Problem]:
    """``n`` problems with images, deterministic given ``rng``'s state.

    ``pool`` ("train" | "eval") picks which digit images and bar triples may be used;
    ``style`` ("id" | "ood") how they are drawn.
    """
    if pool not in ("train", "eval"):
        raise ValueError(f"pool must be 'train' or 'eval', got {pool!r}")
    if style not in ("id", "ood"):
        raise ValueError(f"style must be 'id' or 'ood', got {style!r}")
    digit_style = DigitStyle.ood(ood_style_strength) if style == "ood" else DigitStyle()
    bar_style = BarStyle.ood(ood_style_strength) if style == "ood" else BarStyle()
    digits_pool = digit_pools()[pool]
    triples = bar_pools()[pool]

    order = [f for f, c in family_counts(n, families).items() for _ in range(c)]
    order = [order[i] for i in rng.permutation(len(order))]
    width = max(5, len(str(n - 1)))
    problems = []
    for i, family in enumerate(order):
        templates = TEMPLATES[family]
        template = templates[int(rng.integers(len(templates)))]
        gym: dict[str, Any] = {"family": family, "template": template}
        if family == "bars":
            heights = [int(h) for h in triples[int(rng.integers(len(triples)))]]
            gym["truth"] = {"heights": heights}
            image = render_bars(heights, bar_style)
        else:
            if family == "compare":
                values = [int(v) for v in rng.choice(10, size=3, replace=False)]
            else:
                values = [int(v) for v in rng.integers(0, 10, size=3)]
            ids = [int(digits_pool[v][int(rng.integers(len(digits_pool[v])))]) for v in values]
            gym["truth"] = {"digits": values}
            gym["digit_ids"] = ids
            image = render_digits(ids, digit_style, rng)
        gym["style"] = style
        problems.append(Problem(id=f"{id_prefix}-{i:0{width}d}", gym=gym, image=image))
    return problems
