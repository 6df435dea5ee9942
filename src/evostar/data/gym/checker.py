"""Process ground truth: is each reasoning step of a response true for its gym problem?

This is what the answer filter cannot see (a misread digit can still lead to the right option
letter, ``7 * 8 = 56.`` followed by ``86 + 8 = 70.`` can still end on the gold number), and what
a process reward model is evaluated against.
"""

from __future__ import annotations

import re
from typing import Any

from evostar.records import Sample, split_steps

from .tasks import ORDINALS, compare_target, gold_plan

_ORD = {name: i for i, name in enumerate(ORDINALS)}
_NUM = r"(-?\d+)"
_PERCEIVE_DIGIT = re.compile(rf"the (first|second|third) digit is {_NUM}\.?", re.IGNORECASE)
_PERCEIVE_BAR = re.compile(rf"bar {_NUM} has height {_NUM}\.?", re.IGNORECASE)
_ARITH = re.compile(rf"{_NUM}\s*([-+*×·−])\s*{_NUM}\s*=\s*{_NUM}\.?")
_CONCLUDE = re.compile(rf"the (largest|smallest) is {_NUM}, the (first|second|third) digit\.?", re.IGNORECASE)
_OPS = {"+": "+", "-": "-", "−": "-", "*": "*", "×": "*", "·": "*"}
_COMMUTATIVE = {"+", "*"}


def _apply(x: int, op: str, y: int) -> int:
    return x + y if op == "+" else x - y if op == "-" else x * y


def gym_truth(sample: Sample) -> dict[str, Any]:
    """The gym dict of a sample; ValueError for samples that carry no process ground truth."""
    gym = sample.meta.get("gym") if sample.meta else None
    if not isinstance(gym, dict) or "truth" not in gym:
        raise ValueError(f"sample {sample.id!r} is not a gym problem: no meta['gym'] truth")
    return gym


def check_step(gym: dict[str, Any], step: str) -> bool:
    """One step is correct iff it parses as a known step form and is true for this problem.

    Arithmetic must be right *and* be one of the gold plan's operations on the true values
    (operands may be swapped for + and *): a correct sum of misread digits is still wrong.
    """
    step = step.strip()
    family = gym["family"]
    truth = gym["truth"]
    if m := _PERCEIVE_DIGIT.fullmatch(step):
        if family not in ("arith", "compare"):
            return False
        return truth["digits"][_ORD[m[1].lower()]] == int(m[2])
    if m := _PERCEIVE_BAR.fullmatch(step):
        if family != "bars":
            return False
        k = int(m[1])
        return 1 <= k <= len(truth["heights"]) and truth["heights"][k - 1] == int(m[2])
    if m := _CONCLUDE.fullmatch(step):
        if family != "compare" or m[1].lower() != gym["template"]:
            return False
        value, pos = compare_target(gym)
        return int(m[2]) == value and _ORD[m[3].lower()] == pos
    if m := _ARITH.fullmatch(step):
        x, op, y, z = int(m[1]), _OPS[m[2]], int(m[3]), int(m[4])
        if _apply(x, op, y) != z:
            return False
        for px, pop, py, _ in gold_plan(gym):
            if pop != op:
                continue
            if (x, y) == (px, py) or (op in _COMMUTATIVE and (y, x) == (px, py)):
                return True
        return False
    return False


def check_steps(sample: Sample, response_text: str) -> list[bool]:
    """One bool per step of ``split_steps(response_text)``: is that step true for the problem?

    Unparseable steps count as wrong. Raises ValueError for a sample that is not a gym problem.
    """
    gym = gym_truth(sample)
    return [check_step(gym, step) for step in split_steps(response_text)]
