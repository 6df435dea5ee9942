"""Read Hugging Face `datasets` data as `Sample`s: `save_to_disk` directories and `hf://` ids.

Records are mapped onto the same three layouts the JSON loader knows (MathV360K
``conversations``, MathVista ``pid``/``choices``/``decoded_image``, flat ``question``/``answer``)
and go through the same record parser, so a data set means the same thing whether it arrives as
JSON or as Arrow. Images stored *inside* the data set (an ``Image`` feature: PIL images or
``{"bytes": ...}``) are written once to ``_images/`` next to the data set, because every later
stage (rollouts, SFT, vLLM) reads ``Sample.image`` as a file path. Their bytes are written as
they are (``<id>.png``, ``<id>.jpg``, ... by the encoded format), never re-encoded.

Specs: ``DIR`` (a `Dataset` or `DatasetDict` saved with ``save_to_disk``), ``DIR:SPLIT`` (one
split of a saved `DatasetDict`), ``hf://OWNER/NAME[:SPLIT]`` (`load_dataset`; needs the Hub or
its local cache). `datasets` is imported lazily: plain JSON loading never pays for it.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image as PILImage

from evostar.data.parse import DataError, Where, parse_record
from evostar.records import Sample

__all__ = ["HF_PREFIX", "IMAGE_CACHE_DIR", "is_hf_spec", "load_hf_samples"]

HF_PREFIX = "hf://"
IMAGE_CACHE_DIR = "_images"
_IMAGE_COLUMNS = ("decoded_image", "image", "images")
"""Where a row's image may be, best first: MathVista's ``image`` is a relative path into a zip
that is rarely unpacked, its ``decoded_image`` the picture itself."""
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_FORMAT_EXT = {"JPEG": ".jpg", "PNG": ".png", "GIF": ".gif", "BMP": ".bmp", "WEBP": ".webp", "TIFF": ".tiff"}


class _RowWhere(Where):
    """A row of a data set, for `DataError`s: "<dataset>[split] row 12 (id '7'): field ..."."""

    def __init__(self, label: str, index: int) -> None:
        super().__init__(Path(_UNSAFE.sub("_", label)), index)
        self.label = label

    def error(self, field: str | None, message: str) -> DataError:
        ident = f"id {self.id!r}" if self.id is not None else "no id"
        where = f"{self.label} row {self.index} ({ident})"
        if field == "image" and "not found" in message:
            message += " (relative image paths resolve against image_root / data.image_root)"
        return DataError(f"{where}: field {field!r}: {message}" if field else f"{where}: {message}")


# ----------------------------------------------------------------------------- specs


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file())


def _split_spec(spec: str) -> tuple[str, str | None]:
    """(dataset, split) of ``DIR``, ``DIR:SPLIT``, ``hf://REPO`` or ``hf://REPO:SPLIT``."""
    if spec.startswith(HF_PREFIX):
        repo, sep, split = spec[len(HF_PREFIX) :].partition(":")
        return HF_PREFIX + repo, (split or None) if sep else None
    if _is_saved_dataset(Path(spec)):
        return spec, None
    head, sep, tail = spec.rpartition(":")
    if sep and head and tail and "/" not in tail and _is_saved_dataset(Path(head)):
        return head, tail
    return spec, None


def is_hf_spec(spec: str | os.PathLike) -> bool:
    """True for ``hf://...`` ids and for ``save_to_disk`` directories (optionally ``:SPLIT``).

    Cheap (a few ``stat`` calls, no `datasets` import), so `load_samples` can ask it first.
    """
    s = os.fspath(spec)
    if s.startswith(HF_PREFIX):
        return True
    name, _ = _split_spec(s)
    return _is_saved_dataset(Path(name))


# ----------------------------------------------------------------------------- loading


def _pick_split(data: Any, split: str | None, label: str) -> tuple[Any, str | None]:
    """One `Dataset` out of a `DatasetDict` (the only split, or the one asked for)."""
    from datasets import DatasetDict

    if not isinstance(data, DatasetDict):
        recorded = str(data.split) if getattr(data, "split", None) is not None else None
        if split is not None and recorded is not None and split != recorded:
            raise DataError(f"{label}: split {split!r} asked for, but this data set is split {recorded!r}")
        return data, split or recorded
    names = list(data.keys())
    if split is None:
        if len(names) == 1:
            return data[names[0]], names[0]
        raise DataError(f"{label}: has splits {names}; name one as {label}:SPLIT")
    if split not in data:
        raise DataError(f"{label}: no split {split!r}; it has {names}")
    return data[split], split


def _hub_offline() -> bool:
    flags = (
        os.environ.get("HF_HUB_OFFLINE"),
        os.environ.get("HF_DATASETS_OFFLINE"),
        os.environ.get("TRANSFORMERS_OFFLINE"),
    )
    if any(f is not None and f.upper() in ("1", "ON", "YES", "TRUE") for f in flags):
        return True
    try:
        from datasets import config

        return bool(config.HF_HUB_OFFLINE)
    except Exception:
        return False


def _load_hub(repo: str, split: str | None) -> Any:
    """`load_dataset(repo, split=split)`, turning every failure into one `DataError` that says
    whether the cause is being offline, a missing data set, or a missing split."""
    from datasets import load_dataset

    label = HF_PREFIX + repo
    if not repo or repo.startswith("/"):
        raise DataError(f"{label}: expected hf://OWNER/NAME[:SPLIT]")
    try:
        return load_dataset(repo, split=split)
    # datasets/huggingface_hub raise many types (ConnectionError, HfHubHTTPError, ...)
    except Exception as err:
        reason = f"{type(err).__name__}: {err}".strip()
        if _hub_offline():
            hint = (
                "offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) and the data set is not in "
                "the local cache; on a machine with network run `datasets.load_dataset(...)"
                ".save_to_disk(DIR)` and pass DIR instead"
            )
        elif isinstance(err, (ConnectionError, TimeoutError)) or "couldn't reach" in reason.lower():
            hint = (
                "the Hugging Face Hub cannot be reached (hf:// ids only work online); save the data set "
                "with `save_to_disk(DIR)` where there is network and pass DIR"
            )
        else:
            hint = "check the repository id and the split"
        raise DataError(f"{label}: cannot load with datasets.load_dataset: {hint} ({reason[:300]})") from None


def _rows(ds: Any, batch_size: int = 256) -> Iterator[dict[str, Any]]:
    """Rows as plain dicts, read in batches (per-row Arrow access is much slower).

    `Image` columns are cast to ``decode=False`` so their encoded bytes come back untouched
    (``{"bytes", "path"}``): no decode/re-encode per image. Images inside lists arrive decoded.
    """
    from datasets import Image

    for col, feature in ds.features.items():
        if isinstance(feature, Image) and feature.decode:
            ds = ds.cast_column(col, Image(decode=False))
    for batch in ds.iter(batch_size=batch_size):
        cols = list(batch)
        for i in range(len(batch[cols[0]]) if cols else 0):
            yield {c: batch[c][i] for c in cols}


def _safe_name(ident: str) -> str:
    """A file name for an id; ids that had to be changed get a hash so two cannot collide."""
    safe = _UNSAFE.sub("_", ident).strip("._") or "img"
    if safe != ident:
        safe = f"{safe[:80]}-{hashlib.sha1(ident.encode()).hexdigest()[:8]}"
    return safe


def _write_image(data: bytes, cache: Path, ident: str, where: _RowWhere, field: str) -> str:
    """Write encoded image bytes to ``cache/<id>.<ext>`` once (atomically: ranks of a
    distributed run load data at the same time); reuse an existing file of the same size."""
    try:
        with PILImage.open(io.BytesIO(data)) as im:
            fmt = im.format or "PNG"
    except Exception as e:  # PIL raises many types for bad bytes
        raise where.error(field, f"image bytes cannot be decoded: {e}") from None
    target = cache / f"{_safe_name(ident)}{_FORMAT_EXT.get(fmt, '.' + fmt.lower())}"
    if target.is_file() and target.stat().st_size == len(data):
        return str(target)  # written by an earlier load (or another rank)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)
    except OSError as e:
        raise where.error(field, f"cannot write the image cache {cache}: {e} (pass cache_dir=)") from None
    return str(target)


def _encode_pil(img: PILImage.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=img.format or "PNG")
    return buf.getvalue()


def _image_value(value: Any, where: _RowWhere, field: str, cache: Path, ident: str) -> Any:
    """A row's image as something the record parser takes: a path string or None."""
    if isinstance(value, list):
        if len(value) > 1:
            raise where.error(field, f"{len(value)} images in one row; only single-image prompts are supported")
        value = value[0] if value else None
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, PILImage.Image):
        return _write_image(_encode_pil(value), cache, ident, where, field)
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        if value.get("bytes"):
            return _write_image(value["bytes"], cache, ident, where, field)
        if value.get("path"):
            return str(value["path"])
        return None
    raise where.error(field, f"expected a path, a PIL image or {{'bytes': ...}}, got {type(value).__name__}")


def _jsonable(value: Any) -> bool:
    """Extra columns end up in `Sample.meta`, which is written as JSON."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return True
    if isinstance(value, list):
        return all(_jsonable(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _jsonable(v) for k, v in value.items())
    return False


def _record(row: dict[str, Any], where: _RowWhere, cache: Path, fallback_id: str) -> dict[str, Any]:
    """A row as a JSON-style record with the image as a path (bytes written to the cache)."""
    ident = next((str(row[k]) for k in ("id", "pid") if row.get(k) not in (None, "")), fallback_id)
    where.id = ident
    rec: dict[str, Any] = {}
    image: Any = None
    for col in _IMAGE_COLUMNS:
        if col in row and image is None:
            image = _image_value(row[col], where, col, cache, ident)
    for key, value in row.items():
        if key in _IMAGE_COLUMNS:
            continue
        if _jsonable(value):
            rec[key] = value
    rec["image"] = image
    return rec


def load_hf_samples(
    spec: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    split: str | None = None,
    require_answer: bool = True,
    *,
    check_images: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> list[Sample]:
    """Load a Hugging Face data set as Samples (see the module docstring for the specs).

    ``split`` overrides a ``:SPLIT`` in the spec; a `DatasetDict` with one split needs none.
    Relative image paths resolve against ``image_root`` (default: the saved data set's folder,
    or the working directory for ``hf://``). Embedded images go to ``cache_dir`` (default:
    ``_images/`` next to the data set's Arrow files). Raises `DataError` naming the data set,
    the row and the field.
    """
    name, spec_split = _split_spec(os.fspath(spec))
    split = split or spec_split
    if name.startswith(HF_PREFIX):
        data = _load_hub(name[len(HF_PREFIX) :], split)
        label = name
        base = Path.cwd()
    else:
        base = Path(name)
        if not _is_saved_dataset(base):
            raise DataError(
                f"{name}: not a data set saved with save_to_disk (no dataset_info.json or dataset_dict.json)"
            )
        from datasets import load_from_disk

        try:
            data = load_from_disk(str(base))
        except Exception as e:  # corrupt Arrow files, version mismatch, ...
            raise DataError(f"{name}: datasets.load_from_disk failed: {type(e).__name__}: {e}") from None
        label = str(base)
    ds, split = _pick_split(data, split, label)
    if split is not None and not label.endswith(f":{split}"):
        label = f"{label}:{split}"

    files = [Path(f["filename"]) for f in getattr(ds, "cache_files", []) if f.get("filename")]
    default_cache = files[0].parent / IMAGE_CACHE_DIR if files else base / IMAGE_CACHE_DIR
    cache = Path(os.path.abspath(cache_dir if cache_dir is not None else default_cache))
    root = Path(image_root) if image_root is not None else (base if not name.startswith(HF_PREFIX) else Path.cwd())
    stem = (split or _UNSAFE.sub("_", Path(name).name)) or "row"

    samples: list[Sample] = []
    first_seen: dict[str, int] = {}
    for index, row in enumerate(_rows(ds)):
        where = _RowWhere(label, index)
        rec = _record(row, where, cache, fallback_id=f"{stem}-{index}")
        sample = parse_record(
            rec,
            where,
            image_root=root,
            require_answer=require_answer,
            check_images=check_images,
            fallback_id=f"{stem}-{index}",
        )
        sample.meta["source"] = f"{label} row {index}"
        if sample.id in first_seen:
            raise where.error("id", f"duplicate of row {first_seen[sample.id]}")
        first_seen[sample.id] = index
        samples.append(sample)
    return samples
