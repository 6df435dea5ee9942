"""One raw record (MathV360K, MathVista or flat) -> `Sample`, shared by every loader.

Bad data fails early with a `DataError` that names the file, the record and the field, instead
of a traceback deep inside a training run hours later.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from PIL import Image

from evostar.errors import UserError
from evostar.records import ANSWER_MARKER, Sample

__all__ = ["DataError", "Where", "parse_record"]

IMAGE_TAG = "<image>"
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_HUMAN = ("human", "user")
_GPT = ("gpt", "assistant")
_MATHVISTA_CORE = {"pid", "question", "image", "choices", "answer"}
_FLAT_CORE = {"id", "question", "image", "choices", "answer", "rationale", "meta"}
_MATHV360K_CORE = {"id", "image", "conversations", "choices", "gym"}


class DataError(UserError):
    """A data file or one of its records cannot be used; the message says where and why."""


class Where:
    """Where a record sits, for error messages and ``meta["source"]``."""

    def __init__(self, path: Path, index: int, line: int | None = None) -> None:
        self.path, self.index, self.line = path, index, line
        self.id: str | None = None

    def error(self, field: str | None, message: str) -> DataError:
        parts = [f"line {self.line}"] if self.line is not None else []
        parts.append(f"id {self.id!r}" if self.id is not None else "no id")
        where = f"{self.path} record {self.index} ({', '.join(parts)})"
        return DataError(f"{where}: field {field!r}: {message}" if field else f"{where}: {message}")


# ----------------------------------------------------------------------------- record level


def _text(value: Any) -> str | None:
    """Answers and ids may be stored as numbers; None and blank strings mean missing."""
    if value is None:
        return None
    s = (value if isinstance(value, str) else str(value)).strip()
    return s or None


def _scalar(rec: dict[str, Any], field: str, where: Where) -> str | None:
    """A text or number field as text; a list, mapping or boolean is refused (it would
    otherwise become a gold string such as "['12']" that no response can match)."""
    value = rec.get(field)
    if isinstance(value, bool) or not isinstance(value, (str, int, float, type(None))):
        raise where.error(field, f"expected text or a number, got {type(value).__name__} {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise where.error(field, f"expected text or a finite number, got {value!r}")
    return _text(value)


def _split_gpt(value: str) -> tuple[str | None, str | None]:
    """(rationale, answer) of a gpt turn: the answer follows the last ``# Answer``."""
    if ANSWER_MARKER not in value:
        return None, _text(value)
    head, _, tail = value.rpartition(ANSWER_MARKER)
    return _text(head), _text(tail)


def _conversations(rec: dict[str, Any], where: Where) -> tuple[str, str | None, str | None]:
    turns = rec.get("conversations")
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise where.error("conversations", "expected a list of {'from', 'value'} turns")
    human = next((i for i, t in enumerate(turns) if t.get("from") in _HUMAN), None)
    if human is None:
        raise where.error("conversations", "no human turn")
    for turn in turns:
        if not isinstance(turn.get("value"), (str, type(None))):
            raise where.error("conversations", f"a turn's 'value' must be text, got {type(turn['value']).__name__}")
    question = _text(str(turns[human].get("value") or "").replace(IMAGE_TAG, ""))
    if question is None:
        raise where.error("conversations", "the human turn has no question text")
    gpt = next((t for t in turns[human + 1 :] if t.get("from") in _GPT), None)
    rationale, answer = _split_gpt(str(gpt.get("value") or "")) if gpt else (None, None)
    return question, rationale, answer


def _choice_answer(answer: str, choices: list[str], meta: dict[str, Any]) -> str:
    """Multiple-choice gold answers are option letters (the gym's convention); MathVista
    stores the option text, which is mapped to its letter (original kept in meta)."""
    if answer in choices:
        letter = LETTERS[choices.index(answer)]
        if letter != answer:
            meta["answer_text"] = answer
        return letter
    if len(answer) == 1 and answer.upper() in LETTERS[: len(choices)]:
        return answer.upper()
    return answer


def _resolve_image(value: Any, where: Where, image_root: Path, check_images: bool) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise where.error("image", f"expected a path string, got {type(value).__name__}")
    path = Path(os.path.abspath(image_root / value))
    if not path.is_file():
        raise where.error("image", f"not a file: {path}" if path.exists() else f"file not found: {path}")
    if check_images:
        try:
            with Image.open(path) as im:
                im.verify()
        except Exception as e:  # PIL raises many types for bad files
            raise where.error("image", f"unreadable image {path}: {e}") from None
    return str(path)


def parse_record(
    rec: Any,
    where: Where,
    *,
    image_root: Path,
    require_answer: bool = True,
    check_images: bool = True,
    fallback_id: str | None = None,
) -> Sample:
    """One raw record (MathV360K, MathVista or flat) -> Sample."""
    if not isinstance(rec, dict):
        raise where.error(None, f"expected a JSON object, got {type(rec).__name__}")
    where.id = _scalar(rec, "id", where) or _scalar(rec, "pid", where) or fallback_id
    meta: dict[str, Any] = {}
    rationale: str | None = None

    if "conversations" in rec:
        question, rationale, answer = _conversations(rec, where)
        core = _MATHV360K_CORE
        if "gym" in rec:
            meta["gym"] = rec["gym"]
    else:
        is_mathvista = "pid" in rec
        core = _MATHVISTA_CORE if is_mathvista else _FLAT_CORE
        raw = rec.get("question")
        question = _text(raw.replace(IMAGE_TAG, "")) if isinstance(raw, str) else None
        if question is None:
            got = (
                "missing or empty"
                if raw is None or isinstance(raw, str)
                else f"expected text, got {type(raw).__name__}"
            )
            raise where.error("question", got)
        answer = _scalar(rec, "answer", where)
        if not is_mathvista:
            rationale = _scalar(rec, "rationale", where)
            if isinstance(rec.get("meta"), dict):
                meta.update(rec["meta"])
    meta.update({k: v for k, v in rec.items() if k not in core and k != "decoded_image"})

    choices = rec.get("choices")
    if choices is not None:
        if not isinstance(choices, list) or not choices:
            raise where.error("choices", "expected a non-empty list of option texts")
        if not all(isinstance(c, (str, int, float)) and not isinstance(c, bool) for c in choices):
            raise where.error("choices", "every option must be text or a number")
        choices = [str(c) for c in choices]
        if len(choices) > len(LETTERS):
            raise where.error("choices", f"at most {len(LETTERS)} options are supported")
    if answer is None and require_answer:
        field = "conversations" if "conversations" in rec else "answer"
        raise where.error(field, "no answer: training, validation and test records need their gold answer")
    if answer is not None and choices:
        answer = _choice_answer(answer, choices, meta)
    if choices and "Choices:" not in question:
        # The prompt is rendered from the question alone: options must be in its text (the
        # gym's format), or a MathVista multiple-choice question cannot be answered.
        question += "\nChoices:\n" + "\n".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(choices))

    image = _resolve_image(rec.get("image"), where, image_root, check_images)
    if where.id is None:
        where.id = f"{where.path.stem}-{where.index}"
    meta["source"] = f"{where.path.name}:{where.index}"
    return Sample(
        id=where.id, question=question, image=image, answer=answer, rationale=rationale, choices=choices, meta=meta
    )
