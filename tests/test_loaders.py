"""Loaders: every supported format, and a clear DataError (file, record, field) for bad data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from evostar.data import DataError, build_gym, check_steps, detect_format, load_samples


def _png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (84, 28), (255, 255, 255)).save(path)
    return path


def _write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data))
    return path


def _write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _mathv(rid: str, gpt: str | None = "42", image: str | None = "images/a.png") -> dict:
    turns = [{"from": "human", "value": "<image>\nWhat is shown?"}]
    if gpt is not None:
        turns.append({"from": "gpt", "value": gpt})
    rec: dict[str, Any] = {"id": rid, "conversations": turns}
    if image is not None:
        rec["image"] = image
    return rec


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    _png(tmp_path / "images" / "a.png")
    return tmp_path


# ----------------------------------------------------------------------------- formats


def test_gym_output_round_trips(tmp_path: Path) -> None:
    paths = build_gym(tmp_path, seed=0, n_seed=6, n_train=6, n_val=3, n_test_id=3, n_test_ood=3)
    seed = load_samples(paths["seed"])
    assert [s.id for s in seed] == [f"gym-seed-{i:05d}" for i in range(6)]
    for i, s in enumerate(seed):
        assert Path(s.image).is_absolute() and Path(s.image).is_file()
        assert "<image>" not in s.question and s.question.startswith("The image shows")
        assert s.rationale and s.answer and all(check_steps(s, s.target))
        assert s.meta["source"] == f"seed.json:{i}" and "family" in s.meta["gym"]
        assert (s.choices is not None) == (s.meta["gym"]["family"] == "compare")
    assert all(s.rationale is None for s in load_samples(paths["train"]))


def test_mathv360k_answer_split_and_image_tag(data_dir: Path) -> None:
    recs = [
        _mathv("a", "Step one.\n\nStep two.\n\n# Answer\n\n 7 "),
        _mathv("b", "B"),
        _mathv("c", "# Answer\n\nx\n\n# Answer\n\n12"),
        _mathv("d", image=None),
        {**_mathv("e", "A"), "choices": ["red", "blue"], "extra": 1},
    ]
    samples = load_samples(_write_json(data_dir / "train.json", recs))
    a, b, c, d, e = samples
    assert a.question == "What is shown?"
    assert (a.rationale, a.answer) == ("Step one.\n\nStep two.", "7")
    assert (b.rationale, b.answer) == (None, "B")
    assert (c.rationale, c.answer) == ("# Answer\n\nx", "12")  # after the *last* marker
    assert a.image == str((data_dir / "images" / "a.png").resolve())
    assert d.image is None  # text-only prompt
    assert e.choices == ["red", "blue"] and e.answer == "A" and e.meta["extra"] == 1
    assert a.meta["source"] == "train.json:0" and e.meta["source"] == "train.json:4"


def test_image_root_overrides_the_data_folder(tmp_path: Path) -> None:
    img_root = tmp_path / "imgs"
    _png(img_root / "images" / "a.png")
    data = tmp_path / "data"
    data.mkdir()
    path = _write_json(data / "x.json", [_mathv("a")])
    with pytest.raises(DataError, match="file not found"):
        load_samples(path)
    (s,) = load_samples(path, image_root=img_root)
    assert s.image == str(img_root / "images" / "a.png")


def test_jsonl_mathv360k_and_flat_records(data_dir: Path) -> None:
    recs = [
        _mathv("m1", "r\n\n# Answer\n\n3"),
        {"id": "f1", "image": "images/a.png", "question": "<image>\nHow many?", "answer": 5},
        {
            "id": "f2",
            "image": "images/a.png",
            "question": "Pick one.",
            "answer": "blue",
            "choices": ["red", "blue"],
            "rationale": "It is blue.",
        },
    ]
    path = _write_jsonl(data_dir / "mix.jsonl", recs)
    m1, f1, f2 = load_samples(path)
    assert (m1.rationale, m1.answer) == ("r", "3")
    assert (f1.question, f1.answer, f1.rationale) == ("How many?", "5", None)
    assert f2.answer == "B" and f2.meta["answer_text"] == "blue"  # option text -> letter
    assert f2.rationale == "It is blue." and f2.choices == ["red", "blue"]
    assert f1.meta["source"] == "mix.jsonl:1"


def test_sample_dicts_round_trip_through_jsonl(data_dir: Path) -> None:
    first = load_samples(_write_json(data_dir / "a.json", [_mathv("a", "s\n\n# Answer\n\n1")]))
    path = _write_jsonl(data_dir / "dump.jsonl", [s.to_dict() for s in first])
    (again,) = load_samples(path)
    got, want = again.to_dict(), first[0].to_dict()
    assert got.pop("meta") == {"source": "dump.jsonl:0"} and want.pop("meta")
    assert got == want


def test_format_detection_by_content(data_dir: Path) -> None:
    as_list = data_dir / "list.data"
    _write_json(as_list, [_mathv("a")])
    as_lines = data_dir / "lines.txt"
    _write_jsonl(as_lines, [_mathv("a"), _mathv("b")])
    assert detect_format(as_list) == "json" and detect_format(as_lines) == "jsonl"
    assert [s.id for s in load_samples(as_lines)] == ["a", "b"]
    assert [s.id for s in load_samples(as_list)] == ["a"]


def test_mathvista_keyed_by_pid_and_as_list(data_dir: Path) -> None:
    def rec(pid: str, **kw: Any) -> dict[str, Any]:
        base = {
            "pid": pid,
            "question": "What is the value?",
            "image": "images/a.png",
            "choices": None,
            "unit": None,
            "precision": None,
            "answer": "1.2",
            "question_type": "free_form",
            "answer_type": "float",
            "metadata": {"source": "FigureQA", "task": "figure question answering"},
            "query": "Hint: ... Question: What is the value?",
        }
        return {**base, **kw}

    mc = rec("2", choices=["3", "5", "7"], answer="5", question_type="multi_choice", answer_type="text")
    keyed = {"1": rec("1", precision=1.0), "2": mc}
    a, b = load_samples(_write_json(data_dir / "testmini.json", keyed))
    assert (a.id, a.answer, a.choices) == ("1", "1.2", None)
    assert a.meta["precision"] == 1.0 and a.meta["answer_type"] == "float"
    assert a.meta["metadata"]["source"] == "FigureQA" and "query" in a.meta
    assert (b.id, b.answer, b.choices) == ("2", "B", ["3", "5", "7"])
    assert b.meta["answer_text"] == "5" and b.meta["question_type"] == "multi_choice"
    listed = load_samples(_write_json(data_dir / "list.json", [rec("9", answer=3)]))
    assert listed[0].id == "9" and listed[0].answer == "3"
    unlabeled = rec("10")
    del unlabeled["answer"]
    (u,) = load_samples(_write_json(data_dir / "u.json", [unlabeled]), require_answer=False)
    assert u.answer is None


# ----------------------------------------------------------------------------- errors


def test_missing_image_names_file_record_and_field(data_dir: Path) -> None:
    path = _write_json(data_dir / "train.json", [_mathv("a"), _mathv("gym-x", image="images/no.png")])
    with pytest.raises(DataError) as e:
        load_samples(path)
    missing = (data_dir / "images" / "no.png").resolve()
    assert str(e.value) == (f"{path} record 1 (id 'gym-x'): field 'image': file not found: {missing}")
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize("kind", ["garbage", "truncated"])
def test_corrupt_image(data_dir: Path, kind: str) -> None:
    good = (data_dir / "images" / "a.png").read_bytes()
    bad = b"not an image at all" if kind == "garbage" else good[: len(good) // 2]
    (data_dir / "images" / "bad.png").write_bytes(bad)
    path = _write_json(data_dir / "d.json", [_mathv("a"), _mathv("z", image="images/bad.png")])
    with pytest.raises(DataError, match=r"record 1 \(id 'z'\): field 'image': unreadable image"):
        load_samples(path)
    assert len(load_samples(path, check_images=False)) == 2  # opt-out for trusted data


def test_missing_answer(data_dir: Path) -> None:
    path = _write_json(data_dir / "d.json", [_mathv("a", gpt=None), _mathv("b", gpt="  ")])
    with pytest.raises(DataError, match=r"record 0 \(id 'a'\): field 'conversations': no answer"):
        load_samples(path)
    assert [s.answer for s in load_samples(path, require_answer=False)] == [None, None]
    flat = _write_jsonl(data_dir / "f.jsonl", [{"id": "q", "question": "Why?"}])
    with pytest.raises(DataError, match=r"line 1, id 'q'\): field 'answer': no answer"):
        load_samples(flat)


def test_malformed_jsonl_line_reports_line_number(data_dir: Path) -> None:
    path = data_dir / "d.jsonl"
    path.write_text(json.dumps(_mathv("a")) + "\n\n{not json}\n")
    with pytest.raises(DataError, match=r"d\.jsonl line 3: malformed JSON"):
        load_samples(path)


def test_malformed_json_file(data_dir: Path) -> None:
    path = data_dir / "d.json"
    path.write_text('[\n{"id": "a",\n')
    with pytest.raises(DataError, match=r"d\.json: malformed JSON at line \d+ column \d+"):
        load_samples(path)
    _write_json(path, "just a string")
    with pytest.raises(DataError, match="expected a JSON list"):
        load_samples(path)


def test_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope.json: file not found"):
        load_samples(tmp_path / "nope.json")
    with pytest.raises(DataError, match="not a file"):
        load_samples(tmp_path)


def test_missing_question_or_conversations(data_dir: Path) -> None:
    cases = [
        ({"id": "a", "conversations": "hi"}, "field 'conversations': expected a list"),
        ({"id": "a", "conversations": [{"from": "gpt", "value": "1"}]}, "no human turn"),
        (
            {"id": "a", "conversations": [{"from": "human", "value": "<image>\n"}]},
            "the human turn has no question text",
        ),
        ({"id": "a", "image": "images/a.png", "answer": "1"}, "field 'question': missing"),
        ({"pid": "7", "question": "", "answer": "1"}, r"\(id '7'\): field 'question'"),
        ([1, 2], "expected a JSON object"),
    ]
    for i, (rec, message) in enumerate(cases):
        path = _write_json(data_dir / f"c{i}.json", [rec])
        with pytest.raises(DataError, match=message):
            load_samples(path)


def test_duplicate_ids_and_bad_choices(data_dir: Path) -> None:
    path = _write_json(data_dir / "d.json", [_mathv("a"), _mathv("b"), _mathv("a")])
    with pytest.raises(DataError, match=r"record 2 \(id 'a'\): field 'id': duplicate of record 0"):
        load_samples(path)
    path = _write_json(data_dir / "c.json", [{**_mathv("a"), "choices": "A or B"}])
    with pytest.raises(DataError, match="field 'choices'"):
        load_samples(path)
