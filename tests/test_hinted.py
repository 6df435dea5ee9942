"""Answer-hinted warm-up: the hint reaches the generation prompt only, never a training target."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from evostar.config import OptimConfig, WarmupConfig
from evostar.data.gym import build_gym
from evostar.data.loaders import load_samples
from evostar.hinted import (
    HINTED_ID_SUFFIX,
    REASONS,
    build_warmup_set,
    filter_hinted,
    hinted_prompt,
    leaks_hint,
    pick_prompts,
    warmup_records,
)
from evostar.models.hub import load_model, load_processor
from evostar.models.inputs import VLMInputs
from evostar.models.tiny import TinyModelSpec, build_tiny_qwen2_vl
from evostar.records import Response, Sample, format_response
from evostar.train import Example, SFTTrainer

GOOD = "I read the digits.\n\nI add them up."


pytestmark = pytest.mark.usefixtures("one_thread")


def _sample(sid: str = "s1", answer: str = "7", choices: list[str] | None = None) -> Sample:
    return Sample(id=sid, question="How many dots?", answer=answer, choices=choices, meta={"k": 1})


# ----------------------------------------------------------------------------- pure parts


def test_hinted_prompt_carries_answer_and_format_but_not_the_original():
    s = _sample()
    h = hinted_prompt(s)
    assert h.id == "s1" + HINTED_ID_SUFFIX and h.meta["hinted_from"] == "s1"
    assert h.question.startswith("How many dots?") and "The correct answer is: 7" in h.question
    assert "# Answer" in h.question and "blank line" in h.question
    assert s.question == "How many dots?" and s.id == "s1"  # a copy: the original is untouched
    mc = hinted_prompt(_sample(answer="B", choices=["three", "four"]))
    assert "The correct answer is: (B) four" in mc.question
    with pytest.raises(ValueError, match="no gold answer"):
        hinted_prompt(Sample(id="u", question="q"))


def test_filter_hinted_reasons_add_up_and_targets_are_clean():
    samples = [_sample("a", "7"), _sample("b", "B", ["three", "four"])]
    texts = {
        "a": [
            "Count the dots.\n\n# Answer\n\n7",  # kept
            "Count the dots.\n\n# Answer\n\n7",  # duplicate
            "Count again.\n\n# Answer\n\n7",  # over_limit (keep 1) / kept (keep 2)
            "# Answer\n\n7",  # no_steps
            "The correct answer is: 7\n\n# Answer\n\n7",  # leaks_hint
            "Count.\n\n# Answer\n\n8",  # wrong
        ],
        "b": ["There are four.\n\n# Answer\n\n(B) four", "Hm.\n\nThe given answer says B.\n\n# Answer\n\nB", "Blah"],
    }
    responses = [Response(sample_id=sid + HINTED_ID_SUFFIX, text=t) for sid, ts in texts.items() for t in ts]
    kept, counts = filter_hinted(samples, responses, keep_per_prompt=1)
    assert counts == {"wrong": 2, "no_steps": 1, "leaks_hint": 2, "duplicate": 1, "over_limit": 1, "kept": 2}
    assert sum(counts.values()) == len(responses) and set(counts) == set(REASONS)
    assert [s.id for s in kept] == ["a", "b"]
    assert kept[0].target == "Count the dots.\n\n# Answer\n\n7"
    assert kept[1].target == "There are four.\n\n# Answer\n\nB"  # gold letter, not the model's form
    assert all(s.question == "How many dots?" and not leaks_hint(s.target) for s in kept)

    kept2, counts2 = filter_hinted(samples, responses, keep_per_prompt=2)
    assert counts2["kept"] == 3 and counts2["over_limit"] == 0
    assert [s.id for s in kept2] == ["a", "a#1", "b"] and kept2[1].rationale == "Count again."
    assert kept2[1].meta["warmup"]["from"] == "a" and "hinted_from" not in kept2[1].meta


def test_pick_prompts_and_records_round_trip(tmp_path):
    samples = [_sample(f"s{i}", str(i)) for i in range(10)] + [Sample(id="u", question="q")]
    assert len(pick_prompts(samples, 0, seed=0)) == 10  # unlabeled dropped
    picked = pick_prompts(samples, 4, seed=0)
    assert len(picked) == 4 and picked == pick_prompts(samples, 4, seed=0)
    assert [s.id for s in picked] == sorted((s.id for s in picked), key=lambda x: int(x[1:]))
    kept = [
        Sample(id="s1", question="How many?", answer="B", choices=["x", "y"], rationale="Look.\n\nCount."),
        Sample(id="s1#1", question="How many?", answer="B", choices=["x", "y"], rationale="Count."),
    ]
    path = tmp_path / "warmup_set.json"
    path.write_text(json.dumps(warmup_records(kept)))
    back = load_samples(path)
    assert [(s.id, s.rationale, s.answer, s.target) for s in back] == [
        (s.id, s.rationale, s.answer, s.target) for s in kept
    ]


# ----------------------------------------------------------------------------- with a real model


@pytest.fixture(scope="module")
def copier(tmp_path_factory) -> tuple[torch.nn.Module, VLMInputs, list[Sample], dict[str, str]]:
    """A tiny Qwen2-VL trained (120 steps, ~6 s) to answer hinted prompts by copying the hint, in
    three styles by prompt: good steps, no steps, and steps that quote the hint back."""
    root = tmp_path_factory.mktemp("hinted")
    paths = build_gym(
        root / "data", seed=0, n_seed=0, n_train=24, n_val=0, n_test_id=0, n_test_ood=0, families=(("arith", 1.0),)
    )
    train = load_samples(paths["train"])
    texts = [hinted_prompt(s).question for s in train] + ["user\nassistant\n", "# Answer\n\n", GOOD]
    build_tiny_qwen2_vl(texts, root / "model", TinyModelSpec(num_layers=2, hidden_size=64, intermediate_size=256))
    io = VLMInputs(load_processor(root / "model"))
    model = load_model(root / "model")
    style = {}
    examples = []
    for i, s in enumerate(train):
        style[s.id] = ("leak", "bare", "good", "good")[i % 4]
        rationale = {"leak": f"The correct answer is: {s.answer}", "bare": ""}.get(style[s.id], GOOD)
        examples.append(Example(hinted_prompt(s), format_response(rationale, s.answer)))
    trainer = SFTTrainer(model, VLMInputs(io.processor), OptimConfig(lr=5e-3, schedule="constant", batch_size=12))
    trainer.train(examples, 120, seed=0, progress=False)
    return model.eval(), io, train, style


@pytest.mark.parametrize("keep", [1, 2])
def test_build_warmup_set_with_a_model_that_copies_the_hint(copier, keep):
    model, io, train, style = copier
    originals = {s.id: (s.question, s.answer) for s in train}
    unlabeled = Sample(id="u", question="no answer here", image=train[0].image)
    kept, stats = build_warmup_set(
        model,
        io,
        [*train, unlabeled],
        k=4,
        temperature=1.0,
        max_new_tokens=24,
        batch_size=128,
        seed=0,
        keep_per_prompt=keep,
    )

    # Stats add up.
    assert stats["prompts"] == len(train) and stats["skipped_unlabeled"] == 1
    assert stats["generated"] == 4 * len(train)
    assert sum(stats[r] for r in REASONS) == stats["generated"]
    assert stats["kept"] == len(kept) > 0
    assert stats["kept_prompts"] == len({s.meta["warmup"]["from"] for s in kept})
    assert stats["yield"] == pytest.approx(stats["kept_prompts"] / stats["prompts"])
    assert stats["wrong"] < stats["generated"] / 2  # it did learn to copy the answer
    assert stats["leaks_hint"] > 0 and stats["no_steps"] > 0  # the filter had work to do
    per_prompt = {}
    for s in kept:
        per_prompt[s.meta["warmup"]["from"]] = per_prompt.get(s.meta["warmup"]["from"], 0) + 1
    assert max(per_prompt.values()) <= keep

    # Kept samples are the ORIGINAL prompts with a rationale that led to the gold answer.
    for s in kept:
        src = s.meta["warmup"]["from"]
        assert (s.question, s.answer) == originals[src]
        assert s.rationale and s.target.endswith(f"# Answer\n\n{originals[src][1]}")
        assert style[src] != "leak" or not leaks_hint(s.target)
        # The hint is nowhere in what SFT sees: neither the target nor the prompt.
        assert not leaks_hint(s.target) and "correct answer" not in s.target.lower()
        assert "correct answer" not in io.prompt_text(s).lower()
    # The caller's prompt cache never saw a hinted prompt.
    assert not any(key[0].endswith(HINTED_ID_SUFFIX) for key in io._cache)
    assert all(s.id == s.meta["warmup"]["from"] or "#" in s.id for s in kept)


def test_hinted_prompts_are_encoded_apart_from_originals(copier):
    """Same id in one cache would put the hinted encoding under the original prompt."""
    _, io, train, _ = copier
    s = train[0]
    plain = io.encode_prompt(s)["input_ids"]
    hinted = io.encode_prompt(hinted_prompt(s))["input_ids"]
    assert hinted.shape[1] > plain.shape[1]
    assert torch.equal(io.encode_prompt(s)["input_ids"], plain)


def test_records_keep_images(copier, tmp_path):
    _, _, train, _ = copier
    kept = [Sample(id=s.id, question=s.question, image=s.image, answer=s.answer, rationale="Look.") for s in train[:2]]
    path = tmp_path / "w.json"
    path.write_text(json.dumps(warmup_records(kept)))
    back = load_samples(path, image_root=Path("/nonexistent"))  # absolute paths ignore the root
    assert [b.image for b in back] == [s.image for s in train[:2]]


# ----------------------------------------------------------------------------- in the pipeline


@pytest.mark.skipif(
    not hasattr(WarmupConfig(), "hinted"), reason="warmup.hinted is not a config key yet (proposed pipeline hook)"
)
def test_pipeline_builds_hinted_warmup_set_and_resumes_it(copier, tmp_path):
    from evostar.config import load_config
    from evostar.data.gym import build_gym as gym
    from evostar.models.hub import save_model_and_processor
    from evostar.pipeline import run_experiment

    model, io, train, _ = copier
    save_model_and_processor(model, io.processor, tmp_path / "copier")
    paths = gym(
        tmp_path / "data", seed=1, n_seed=0, n_train=0, n_val=2, n_test_id=2, n_test_ood=0, families=(("arith", 1.0),)
    )
    overrides = [
        f"output_dir={tmp_path / 'run'}",
        f"model.path={tmp_path / 'copier'}",
        f"data.train={_answers_only(train, tmp_path)}",
        f"data.val={paths['val']}",
        f"data.test={paths['test_id']}",
        "warmup.steps=2",
        "warmup.eval_every=2",
        "warmup.hinted=true",
        "warmup.hinted_k=4",
        "warmup.hinted_temperature=1.0",
        "gen.max_new_tokens=24",
        "gen.k=2",
        "evolve.iterations=1",
        "evolve.steps_per_iteration=1",
        "eval.pass_k=0",
        "progress=false",
        "threads=1",
        "device=cpu",
    ]
    summary = run_experiment(load_config(None, overrides))
    stats = summary["hinted_warmup"]
    assert stats["prompts"] == len(train) and stats["generated"] == 4 * len(train)
    assert sum(stats[r] for r in REASONS) == stats["generated"] and stats["kept"] > 0
    saved = load_samples(tmp_path / "run" / "warmup_set.json")
    assert len(saved) == stats["kept"] and all(s.rationale and not leaks_hint(s.target) for s in saved)
    assert all("correct answer" not in s.question.lower() for s in saved)
    again = run_experiment(load_config(None, overrides), resume=True)  # read back, not regenerated
    assert again["hinted_warmup"] == stats and again["accuracy"] == summary["accuracy"]


def _answers_only(samples: list[Sample], tmp_path: Path) -> Path:
    """The samples as an answer-only MathV360K file (what data.train holds)."""
    records = [
        {
            "id": s.id,
            "image": s.image,
            "conversations": [{"from": "human", "value": f"<image>\n{s.question}"}, {"from": "gpt", "value": s.answer}],
        }
        for s in samples
    ]
    path = tmp_path / "train_answers.json"
    path.write_text(json.dumps(records))
    return path
