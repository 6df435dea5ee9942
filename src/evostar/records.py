"""Typed records: the data that flows between stages.

A *Sample* is one prompt (image + question, optional gold answer and gold chain of thought).
A *Response* is one generated chain of thought for a sample, with everything the reward and
selection stages learn about it. Both round-trip through plain JSON dicts so every stage's
output can be written as JSONL in the run directory and read back on resume.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

ANSWER_MARKER = "# Answer"
STEP_SEPARATOR = "\n\n"


@dataclass
class Sample:
    """One prompt: an image, a question and (when labeled) the gold answer."""

    id: str
    question: str
    image: str | None = None
    """Absolute path of the image file (None for text-only prompts)."""
    answer: str | None = None
    """Gold final answer; None for unlabeled prompts."""
    rationale: str | None = None
    """Gold chain of thought *without* the answer block (seed / warm-up data only)."""
    choices: list[str] | None = None
    """Option texts of a multiple-choice question, in letter order (A, B, C, ...)."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Anything else: source file, task name, the gym's ground truth for step checking."""

    @property
    def target(self) -> str:
        """The full gold response: rationale followed by the answer block."""
        if self.answer is None:
            raise ValueError(f"sample {self.id!r} has no answer")
        return format_response(self.rationale or "", self.answer)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Sample:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


@dataclass
class Response:
    """One generated response to a sample, and what the reward stages found out about it."""

    sample_id: str
    text: str
    temperature: float = 1.0
    iteration: int = -1
    extracted: str | None = None
    """Final answer extracted from the text (None when the response has no answer)."""
    correct: bool | None = None
    """Final answer matches the gold answer."""
    steps_correct: list[bool] | None = None
    """Process ground truth per step (the gym's checker); None where unknown."""
    step_scores: list[float] | None = None
    """Process reward model score per step."""
    score: float | None = None
    """Response-level score used for ranking (PRM: min over steps)."""
    answer_score: float | None = None
    """Process reward model score of the `# Answer` block (None: no block, or not scored)."""

    @property
    def all_steps_correct(self) -> bool | None:
        if self.steps_correct is None:
            return None
        return bool(self.steps_correct) and all(self.steps_correct)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Response:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


def format_response(rationale: str, answer: str) -> str:
    """Join reasoning steps and the answer block the way every response must end."""
    rationale = rationale.strip()
    block = f"{ANSWER_MARKER}{STEP_SEPARATOR}{answer}"
    return f"{rationale}{STEP_SEPARATOR}{block}" if rationale else block


def split_steps(text: str) -> list[str]:
    """The reasoning steps of a response: paragraphs before the `# Answer` block."""
    body = text.split(ANSWER_MARKER, 1)[0]
    return [p.strip() for p in body.split(STEP_SEPARATOR) if p.strip()]


def group_by_sample(responses: Sequence[Response]) -> dict[str, list[Response]]:
    """Responses per prompt (sample id), prompts in order of first appearance."""
    groups: dict[str, list[Response]] = defaultdict(list)
    for r in responses:
        groups[r.sample_id].append(r)
    return dict(groups)
