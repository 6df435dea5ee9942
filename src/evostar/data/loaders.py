"""Read prompt data into `Sample`s: MathV360K-style JSON (also what the gym writes), JSONL,
MathVista, and Hugging Face `datasets` (`evostar.data.hf_datasets`). Records are parsed by
`evostar.data.parse`; bad data fails at load time with the file, record and field named."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from evostar.data.hf_datasets import is_hf_spec, load_hf_samples
from evostar.data.parse import DataError, Where, parse_record
from evostar.records import Sample

__all__ = ["DataError", "detect_format", "load_samples"]

# ----------------------------------------------------------------------------- file level


def detect_format(path: str | Path, text: str | None = None) -> str:
    """The file format, "json" or "jsonl": by extension, else by content."""
    suffix = Path(path).suffix.lower()
    if suffix == ".json":
        return "json"
    if suffix == ".jsonl":
        return "jsonl"
    if text is None:
        text = Path(path).read_text(encoding="utf-8")
    try:
        json.loads(text)
        return "json"
    except json.JSONDecodeError:
        return "jsonl"


def _read_records(path: Path) -> list[tuple[dict[str, Any] | Any, Where, str | None]]:
    """Raw records with their location (and a fallback id: MathVista's dict key)."""
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read as UTF-8 text: {e}") from None

    if not text.strip():
        return []  # an empty file has no records (the caller says whether that is allowed)
    if detect_format(path, text) == "jsonl":
        out = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
            out.append((rec, Where(path, len(out), lineno), None))
        return out

    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if isinstance(data, list):
        return [(rec, Where(path, i), None) for i, rec in enumerate(data)]
    if isinstance(data, dict) and all(isinstance(v, dict) for v in data.values()):
        # MathVista: {"1": {...}, "2": {...}} keyed by pid
        return [(rec, Where(path, i), str(key)) for i, (key, rec) in enumerate(data.items())]
    raise DataError(
        f"{path}: expected a JSON list of records or an object of records keyed by pid, got {type(data).__name__}"
    )


def load_samples(
    path: str | Path, image_root: str | Path | None = None, require_answer: bool = True, *, check_images: bool = True
) -> list[Sample]:
    """Load a data file as Samples, auto-detecting its format.

    Formats: MathV360K JSON list (``conversations``; what the gym writes), JSONL with the same
    records or flat ``{id, image, question, answer, choices?, rationale?}`` records, and
    MathVista (object keyed by pid, or a list). Image paths resolve against ``image_root``
    or else the data file's folder and are stored absolute; with ``check_images`` each image
    is opened and verified. Raises DataError on anything unusable, including duplicate ids.
    Hugging Face data sets (a ``save_to_disk`` directory, ``DIR:SPLIT`` or ``hf://REPO[:SPLIT]``)
    go to `evostar.data.hf_datasets.load_hf_samples`.
    """
    if is_hf_spec(path):
        return load_hf_samples(path, image_root=image_root, require_answer=require_answer, check_images=check_images)
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    samples: list[Sample] = []
    first_seen: dict[str, int] = {}
    for rec, where, fallback_id in _read_records(path):
        sample = parse_record(
            rec,
            where,
            image_root=root,
            require_answer=require_answer,
            check_images=check_images,
            fallback_id=fallback_id,
        )
        if sample.id in first_seen:
            raise where.error("id", f"duplicate of record {first_seen[sample.id]}")
        first_seen[sample.id] = where.index
        samples.append(sample)
    return samples
