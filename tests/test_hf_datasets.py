"""Hugging Face `datasets` input: save_to_disk directories (path columns, Image features,
DatasetDict splits) read through `load_samples`, and hf:// ids failing clearly offline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset, DatasetDict, Features, Image, List, Value
from PIL import Image as PILImage
from PIL import ImageDraw

from evostar.data.hf_datasets import is_hf_spec, load_hf_samples
from evostar.data.loaders import DataError, load_samples

pytestmark = pytest.mark.usefixtures("one_thread")


def _dots(n: int, seed: int = 0) -> PILImage.Image:
    """A white canvas with n black dots: a real picture with a countable answer."""
    rng = np.random.default_rng(seed)
    img = PILImage.new("RGB", (56, 28), "white")
    draw = ImageDraw.Draw(img)
    for _ in range(n):
        x, y = (int(v) for v in rng.integers(3, (52, 24)))
        draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill="black")
    return img


def _conv(question: str, answer: str | None) -> list[dict[str, str]]:
    turns = [{"from": "human", "value": f"<image>\n{question}"}]
    if answer is not None:
        turns.append({"from": "gpt", "value": answer})
    return turns


def _mathv360k(tmp_path: Path, answers: list[str | None] | None = None, images: list[str] | None = None) -> Path:
    """MathV360K layout: id, relative image path, conversations; images under tmp/pics."""
    answers = answers if answers is not None else ["1", "2", "3"]
    (tmp_path / "pics").mkdir(exist_ok=True)
    rels = images or [f"pics/{i}.png" for i in range(len(answers))]
    for i, rel in enumerate(rels):
        if rel.startswith("pics/") and i < 3:
            _dots(i + 1, seed=i).save(tmp_path / rel)
    ds = Dataset.from_dict(
        {
            "id": [f"m{i}" for i in range(len(answers))],
            "image": rels,
            "conversations": [_conv("How many dots are there?", a) for a in answers],
        }
    )
    ds.save_to_disk(tmp_path / "mathv360k")
    return tmp_path / "mathv360k"


MATHVISTA_FEATURES = Features(
    {
        "pid": Value("string"),
        "question": Value("string"),
        "image": Value("string"),
        "decoded_image": Image(),
        "choices": List(Value("string")),
        "precision": Value("float64"),
        "answer": Value("string"),
        "question_type": Value("string"),
        "answer_type": Value("string"),
        "metadata": {"task": Value("string"), "skills": List(Value("string"))},
    }
)


def _mathvista_rows(n: int = 3) -> dict[str, list]:
    """MathVista layout: the picture in `decoded_image` (Image feature), `image` a zip path."""
    mc = [i % 2 == 1 for i in range(n)]
    return {
        "pid": [str(i + 1) for i in range(n)],
        "question": ["Which shape has more dots?" if m else "How many dots?" for m in mc],
        "image": [f"images/{i + 1}.jpg" for i in range(n)],
        "decoded_image": [_dots(i + 2, seed=10 + i) for i in range(n)],
        "choices": [["left", "right"] if m else None for m in mc],
        "precision": [None] * n,
        "answer": ["right" if m else str(i + 2) for i, m in enumerate(mc)],
        "question_type": ["multi_choice" if m else "free_form" for m in mc],
        "answer_type": ["text" if m else "integer" for m in mc],
        "metadata": [{"task": "figure question answering", "skills": ["arithmetic reasoning"]}] * n,
    }


# ----------------------------------------------------------------------------- path columns


def test_mathv360k_path_column(tmp_path):
    saved = _mathv360k(tmp_path)
    assert is_hf_spec(saved) and is_hf_spec(str(saved)) and not is_hf_spec(tmp_path / "pics")
    samples = load_samples(saved, image_root=tmp_path)
    assert [(s.id, s.question, s.answer) for s in samples] == [
        ("m0", "How many dots are there?", "1"),
        ("m1", "How many dots are there?", "2"),
        ("m2", "How many dots are there?", "3"),
    ]
    assert samples[1].image == str(tmp_path / "pics" / "1.png") and os.path.isabs(samples[0].image)
    assert samples[2].meta["source"] == f"{saved} row 2"
    assert not (saved / "_images").exists()  # nothing to cache for path columns

    # Without image_root, relative paths resolve against the data set's directory.
    with pytest.raises(DataError) as err:
        load_samples(saved)
    msg = str(err.value)
    assert str(saved) in msg and "row 0" in msg and "'image'" in msg and "image_root" in msg


def test_bad_rows_name_dataset_row_and_field(tmp_path):
    saved = _mathv360k(tmp_path, answers=["1", None, "3"])
    with pytest.raises(DataError, match=r"mathv360k row 1 \(id 'm1'\): field 'conversations': no answer"):
        load_samples(saved, image_root=tmp_path)
    unlabeled = load_hf_samples(saved, image_root=tmp_path, require_answer=False)
    assert [s.answer for s in unlabeled] == ["1", None, "3"]

    other = tmp_path / "dup"
    other.mkdir()
    Dataset.from_dict({"id": ["a", "a"], "question": ["q", "q"], "answer": ["1", "2"]}).save_to_disk(other / "ds")
    with pytest.raises(DataError, match=r"row 1 \(id 'a'\): field 'id': duplicate of row 0"):
        load_samples(other / "ds")

    broken = Dataset.from_dict(
        {"id": ["x"], "question": ["q"], "answer": ["1"], "image": [{"bytes": b"\x89PNG no", "path": None}]},
        features=Features(
            {"id": Value("string"), "question": Value("string"), "answer": Value("string"), "image": Image()}
        ),
    )
    broken.save_to_disk(other / "broken")
    with pytest.raises(DataError, match=r"broken row 0 \(id 'x'\): field 'image': image bytes cannot be decoded"):
        load_samples(other / "broken")


# ----------------------------------------------------------------------------- Image features


def test_mathvista_image_feature_is_cached_once(tmp_path):
    rows = _mathvista_rows()
    Dataset.from_dict(rows, features=MATHVISTA_FEATURES).save_to_disk(tmp_path / "mv")
    samples = load_samples(tmp_path / "mv")
    cache = tmp_path / "mv" / "_images"
    assert sorted(os.listdir(cache)) == ["1.png", "2.png", "3.png"]
    for s, img in zip(samples, rows["decoded_image"], strict=True):
        assert s.image == str(cache / f"{s.id}.png")
        with PILImage.open(s.image) as im:
            assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(img))  # lossless
    # MathVista semantics are the JSON loader's: option text -> letter, metadata kept.
    assert samples[1].choices == ["left", "right"] and samples[1].answer == "B"
    assert samples[1].meta["answer_text"] == "right" and samples[0].answer == "2"
    assert samples[0].meta["metadata"]["task"] == "figure question answering"
    assert "decoded_image" not in samples[0].meta

    # A second load reuses the files instead of writing them again.
    stamps = {p: p.stat().st_mtime_ns for p in cache.iterdir()}
    again = load_samples(tmp_path / "mv")
    assert [s.image for s in again] == [s.image for s in samples]
    assert {p: p.stat().st_mtime_ns for p in cache.iterdir()} == stamps


def test_dataset_dict_splits(tmp_path):
    def flat(n: int, offset: int) -> Dataset:
        return Dataset.from_dict(
            {
                "question": ["How many dots?"] * n,
                "answer": [str(i + offset) for i in range(n)],
                "image": [_dots(i + offset, seed=i) for i in range(n)],
            },
            features=Features({"question": Value("string"), "answer": Value("string"), "image": Image()}),
        )

    DatasetDict({"train": flat(4, 1), "test": flat(2, 5)}).save_to_disk(tmp_path / "dd")
    root = tmp_path / "dd"
    with pytest.raises(DataError, match=r"has splits \['train', 'test'\]; name one as .*:SPLIT"):
        load_samples(root)
    train = load_samples(f"{root}:train")
    assert [s.answer for s in train] == ["1", "2", "3", "4"]
    assert [s.id for s in train] == ["train-0", "train-1", "train-2", "train-3"]  # no id column
    assert all(Path(s.image).parent == root / "train" / "_images" for s in train)
    test = load_hf_samples(root, split="test")
    assert [s.answer for s in test] == ["5", "6"] and Path(test[0].image).parent == root / "test" / "_images"
    assert [s.answer for s in load_samples(root / "test")] == ["5", "6"]  # a split directory alone
    with pytest.raises(DataError, match=r"no split 'dev'; it has \['train', 'test'\]"):
        load_hf_samples(root, split="dev")
    assert not is_hf_spec(f"{root}:train/x") and is_hf_spec(f"{root}:train")


# ----------------------------------------------------------------------------- hub ids


def test_hub_id_offline_is_a_clear_error(tmp_path):
    """hf:// needs the Hub; offline (and not cached) the error says so and how to get around it."""
    code = (
        "from evostar.data.loaders import load_samples, DataError\n"
        "try:\n    load_samples('hf://evostar-test/does-not-exist:train')\n"
        "except DataError as e:\n    print('DataError:', e)\n"
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(tmp_path),
        "HF_DATASETS_CACHE": str(tmp_path / "datasets"),
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "DataError: hf://evostar-test/does-not-exist" in out and "offline" in out and "save_to_disk" in out
