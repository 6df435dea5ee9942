"""The PRM on a tiny random-init Qwen2-VL and real gym samples: continuing a response prefix,
end-to-end Monte-Carlo labelling, training at the step tags, scoring, save and reload."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from evostar.config import OptimConfig
from evostar.data.gym import build_gym, check_steps
from evostar.data.loaders import load_samples
from evostar.demo import gym_texts
from evostar.errors import UserError
from evostar.models.hub import ModelLoadError, load_model, load_processor
from evostar.models.inputs import VLMInputs
from evostar.models.lora import vision_modules
from evostar.models.tiny import TinyModelSpec, build_tiny_qwen2_vl
from evostar.records import Response, Sample, split_steps
from evostar.reward.answer import answers_match, extract_answer
from evostar.reward.prm import (
    PRMTrainer,
    StepLabels,
    examples_from_labels,
    hf_completer,
    init_prm,
    label_responses,
    load_prm,
    score_responses,
)
from evostar.reward.prm.labels import MANIFEST
from evostar.reward.prm.model import PRM_CONFIG, response_segments
from evostar.reward.prm.score import aggregate_scores
from evostar.rollout.hf import complete

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prm")
    build_gym(root / "data", seed=0, n_seed=4, n_train=4, n_val=2, n_test_id=2, n_test_ood=2)
    build_tiny_qwen2_vl(gym_texts(root / "data"), root / "model", TinyModelSpec(num_layers=1))
    return root


@pytest.fixture(scope="module")
def seed(tiny) -> list[Sample]:
    return load_samples(tiny / "data" / "seed.json")


@pytest.fixture(scope="module")
def policy(tiny):
    model = load_model(tiny / "model")
    return model, VLMInputs(load_processor(tiny / "model"))


def misread(sample: Sample) -> str:
    """The gold response with the first digit of its first step changed: a wrong first step."""
    steps = split_steps(sample.target)
    steps[0] = re.sub(r"\d", lambda m: str((int(m[0]) + 1) % 10), steps[0], count=1)
    return "\n\n".join(steps) + "\n\n# Answer\n\n" + sample.answer


# ----------------------------------------------------------------------------- completions


def test_complete_continues_exactly_what_the_model_would_have_written(seed, policy):
    model, io = policy
    sample = seed[0]
    batch = io.collate_prompts([sample])
    out = model.generate(
        **batch, max_new_tokens=12, do_sample=False, eos_token_id=io.stop_token_ids, pad_token_id=io.pad_id
    )
    generated = out[0, batch["input_ids"].shape[1] :].tolist()
    special = set(io.tokenizer.all_special_ids)
    k = next(
        k
        for k in range(6, 0, -1)  # a prefix that re-tokenizes to the same ids
        if not special & set(generated[:k])
        and io.tokenizer(io.tokenizer.decode(generated[:k]), add_special_tokens=False)["input_ids"] == generated[:k]
    )
    prefix = io.tokenizer.decode(generated[:k])
    (continuation,) = complete(model, io, [sample], [prefix], temperature=0, max_new_tokens=len(generated) - k)[0]
    assert continuation == io.tokenizer.decode(generated[k:], skip_special_tokens=True).rstrip()
    # left padding and batching change nothing
    pairs = [(seed[1], "The first digit is 3.\n\nThe second"), (sample, prefix), (seed[2], "")]
    together = complete(model, io, [s for s, _ in pairs], [p for _, p in pairs], temperature=0, max_new_tokens=6)
    alone = [complete(model, io, [s], [p], temperature=0, max_new_tokens=6)[0] for s, p in pairs]
    assert together == alone


def test_complete_samples_n_seeded_continuations_per_prefix(seed, policy):
    model, io = policy
    prefixes = ["The first digit is 1.\n\n", ""]
    torch.manual_seed(5)
    a = complete(model, io, seed[:2], prefixes, n=3, max_new_tokens=5, batch_size=4)
    torch.manual_seed(5)
    b = complete(model, io, seed[:2], prefixes, n=3, max_new_tokens=5, batch_size=4)
    assert a == b and [len(x) for x in a] == [3, 3] and len({*a[0], *a[1]}) > 1
    with pytest.raises(ValueError, match="2 samples but 1 prefixes"):
        complete(model, io, seed[:2], prefixes[:1])


# ----------------------------------------------------------------------------- labelling


class Recording:
    """The real completer, counting its calls, keeping what it returned, dying on call `fail_on`."""

    def __init__(self, inner, fail_on: int | None = None) -> None:
        self.inner, self.fail_on, self.outputs = inner, fail_on, []

    def __call__(self, samples: Sequence[Sample], prefixes: Sequence[str], n: int) -> list[list[str]]:
        if self.fail_on is not None and len(self.outputs) + 1 == self.fail_on:
            raise KeyboardInterrupt("killed")
        self.outputs.append(self.inner(samples, prefixes, n))
        return self.outputs[-1]


def _label_set(seed: list[Sample]) -> list[Response]:
    """Two responses no tiny random model completes correctly, and two whose first step states
    the gold answer, which the judge then finds in every prefix ("the answer is X")."""
    stated = [f"The answer is {s.answer}.\n\n{s.target}" for s in seed[:2]]
    texts = [seed[0].target, misread(seed[1]), *stated]
    return [Response(sample_id=s.id, text=t) for s, t in zip([seed[0], seed[1], seed[0], seed[1]], texts, strict=True)]


def test_end_to_end_labelling_with_the_real_completer(seed, policy, tmp_path):
    model, io = policy
    completer = hf_completer(model, io, max_new_tokens=8)
    responses = _label_set(seed)
    runs = {}
    for strategy in ("every", "binary"):
        out = tmp_path / strategy
        runs[strategy] = label_responses(seed, responses, completer, out, n=2, strategy=strategy, chunk_size=3)
        assert json.loads((out / MANIFEST).read_text())["done"] == [0, 1]
    for every, binary, r in zip(runs["every"], runs["binary"], responses, strict=True):
        n_steps = len(split_steps(r.text))
        stated = r.text.startswith("The answer is")
        for lab in (every, binary):
            assert lab.sample_id == r.sample_id and lab.text == r.text
            assert len(lab.hard) == len(lab.soft) == len(lab.estimated) == n_steps
            assert lab.hard == [stated] * n_steps and lab.first_error == (None if stated else 0)
        assert every.completions == 2 * n_steps > binary.completions
    assert all(lab.correct for lab in runs["every"])  # the misread one still ends on the gold answer


def test_killed_real_labelling_resumes_and_draws_the_same_completions(seed, policy, tmp_path):
    model, io = policy
    responses = _label_set(seed)
    kwargs = dict(n=2, strategy="every", chunk_size=2, settings={"temperature": 1.0, "max_new_tokens": 6})
    full = Recording(hf_completer(model, io, max_new_tokens=6))
    expected = label_responses(seed, responses, full, tmp_path / "full", **kwargs)
    assert len(full.outputs) == 2  # every: one call per chunk
    with pytest.raises(KeyboardInterrupt):
        label_responses(seed, responses, Recording(full.inner, fail_on=2), tmp_path / "run", **kwargs)
    resumed = Recording(full.inner)
    labels = label_responses(seed, responses, resumed, tmp_path / "run", **kwargs)
    assert len(resumed.outputs) == 1  # chunk 1 was not redone
    assert resumed.outputs[0] == full.outputs[1]  # the chunk's own seed: the same draws
    assert [lab.to_dict() for lab in labels] == [lab.to_dict() for lab in expected]


# ----------------------------------------------------------------------------- the model


def test_tags_follow_every_step_and_the_answer_block(tiny, seed):
    prm = init_prm(tiny / "model")
    assert prm.tokens.added == () and (prm.tokens.plus, prm.tokens.minus) == ("+", "-")
    for ids in (prm.tokens.tag_id, prm.tokens.plus_id, prm.tokens.minus_id):
        assert ids not in prm.io.tokenizer.all_special_ids
    text = seed[0].target
    ids, tags, n_steps = prm.response_ids(text)
    steps, block = response_segments(text)
    assert n_steps == len(steps) and len(tags) == len(steps) + 1 and block.startswith("# Answer")
    assert [ids[t] for t in tags] == [prm.tokens.tag_id] * len(tags)
    untagged = [i for k, i in enumerate(ids) if k not in set(tags)]
    assert prm.io.tokenizer.decode(untagged) == text  # the text between the tags is the response
    assert prm.response_ids("") == ([], [], 0)
    for tag, expect in (("<|im_start|>", "reserves"), ("<|image_pad|>", "reserves"), ("+", "three different")):
        with pytest.raises(UserError, match=expect):
            init_prm(tiny / "model", tag=tag)


def guessed(sample: Sample) -> str:
    """A response whose steps the gym's checker cannot parse (so all wrong) after a right one."""
    first = split_steps(sample.target)[0]
    return f"{first}\n\nMaybe it is so.\n\nOr not.\n\n# Answer\n\n{sample.answer}0"


def _labels(seed: list[Sample]) -> list[StepLabels]:
    """Gold responses (all steps right) and guessed ones (wrong from the second step), labelled
    by the gym's truth the way binary search labels them: positive before the first error."""
    out = []
    for s in seed:
        for text in (s.target, guessed(s)):
            truth = check_steps(s, text)
            first = next((k for k, ok in enumerate(truth) if not ok), None)
            hard = [first is None or k < first for k in range(len(truth))]
            soft = [0.75 if h else 0.0 for h in hard]
            correct = answers_match(extract_answer(text), s.answer, s.choices)
            out.append(StepLabels(s.id, text, hard, soft, [True] * len(hard), first, 0, correct))
    assert {lab.first_error for lab in out} == {None, 1} and {lab.correct for lab in out} == {True, False}
    return out


def test_training_lowers_the_tag_loss_and_a_reload_scores_the_same(tiny, seed, tmp_path):
    torch.manual_seed(0)
    prm = init_prm(tiny / "model")
    examples = examples_from_labels(_labels(seed), {s.id: s for s in seed}, label="hard")
    assert len(examples) == 2 * len(seed) and all(len(e.targets) == len(split_steps(e.text)) + 1 for e in examples)
    trainer = PRMTrainer(prm, OptimConfig(lr=1e-3, schedule="constant", batch_size=8))
    before = trainer.evaluate_loss(examples)
    result = trainer.train(examples, num_steps=8, seed=0)
    after = trainer.evaluate_loss(examples)
    assert result["steps"] == 8 and result["negative_weight"] == 1.0
    assert after < before / 2, (before, after)

    texts = [e.text for e in examples]
    samples = [e.sample for e in examples]
    scores = prm.score(samples, texts)
    prm.save(tmp_path / "prm")
    assert (tmp_path / "prm" / PRM_CONFIG).is_file() and not (tmp_path / "prm.tmp").exists()
    reloaded = load_prm(tmp_path / "prm")
    assert reloaded.tokens == prm.tokens
    assert reloaded.score(samples, texts) == scores
    with pytest.raises(ModelLoadError, match="not a PRM checkpoint"):
        load_prm(tiny / "model")


def test_soft_labels_balanced_negatives_and_a_frozen_vision_tower(tiny, seed):
    prm = init_prm(tiny / "model")
    labels = _labels(seed)
    examples = examples_from_labels(labels, {s.id: s for s in seed}, label="soft", answer=False)
    assert all(e.targets[-1] is None for e in examples)  # the answer block's tag is not trained
    assert {t for e in examples for t in e.targets if t is not None} <= {0.75, 0.0}
    trainer = PRMTrainer(prm, OptimConfig(lr=1e-3, batch_size=4), negative_weight=0.0, freeze_vision=True)
    frozen = {n: p.detach().clone() for n, p in prm.model.named_parameters() if not p.requires_grad}
    tower = vision_modules(prm.model)[0][0]
    assert frozen and all(n.startswith(tower + ".") for n in frozen)  # the tower, not its merger
    text = [p for n, p in prm.model.named_parameters() if "embed_tokens" in n][0]
    text_before = text.detach().clone()
    result = trainer.train(examples, num_steps=2, seed=1)
    targets = [t for e in examples for t in e.targets if t is not None]
    assert result["negative_weight"] == pytest.approx(sum(targets) / sum(1 - t for t in targets))
    params = dict(prm.model.named_parameters())
    assert all(torch.equal(params[n], before) for n, before in frozen.items())
    assert not torch.equal(text, text_before)


def test_a_tag_the_tokenizer_lacks_is_added_and_survives_a_reload(tiny, seed, tmp_path):
    before = len(load_processor(tiny / "model").tokenizer)
    prm = init_prm(tiny / "model", tag="<|prm_step|>")
    assert prm.tokens.added == ("<|prm_step|>",) and len(prm.io.tokenizer) == before + 1
    assert prm.model.get_input_embeddings().weight.shape[0] >= before + 1
    texts = [seed[0].target, misread(seed[1])]
    scores = prm.score(seed[:2], texts)
    prm.save(tmp_path / "prm")
    reloaded = load_prm(tmp_path / "prm")
    assert reloaded.tokens == prm.tokens and reloaded.score(seed[:2], texts) == scores


def test_score_responses_fills_steps_answer_and_aggregate(tiny, seed):
    prm = init_prm(tiny / "model")
    texts = [seed[0].target, "The first digit is 4.\n\nThe second digit", "", "# Answer\n\n7", misread(seed[2])]
    ids = [seed[0].id, seed[1].id, seed[1].id, seed[2].id, seed[2].id]
    one = [Response(sample_id=i, text=t) for i, t in zip(ids, texts, strict=True)]
    score_responses(prm, seed, one, batch_size=1)
    batched = [Response(sample_id=i, text=t) for i, t in zip(ids, texts, strict=True)]
    score_responses(prm, seed, batched, aggregate="mean", batch_size=8)
    for r, b in zip(one, batched, strict=True):
        assert len(r.step_scores) == len(split_steps(r.text))
        assert b.step_scores == pytest.approx(r.step_scores, abs=1e-5)  # padding changes nothing
        assert all(0 < s < 1 for s in r.step_scores)
        assert r.score == aggregate_scores(r.step_scores, r.answer_score, "min")
        if r.score is not None:
            assert b.score == pytest.approx(aggregate_scores(r.step_scores, r.answer_score, "mean"), abs=1e-5)
    assert one[1].answer_score is None and one[1].score == min(one[1].step_scores)  # no answer block
    assert one[2].step_scores == [] and one[2].answer_score is None and one[2].score is None  # empty
    assert one[3].step_scores == [] and one[3].score == one[3].answer_score  # only an answer block
    with pytest.raises(UserError, match="response 0: sample_id 'nope'"):
        score_responses(prm, seed, [Response(sample_id="nope", text="x")])


def test_bf16_autocast_scoring_stays_close_to_float32(tiny, seed):
    prm = init_prm(tiny / "model")
    texts = [seed[0].target, misread(seed[1]), seed[2].target]
    full = [Response(sample_id=s.id, text=t) for s, t in zip(seed, texts, strict=False)]
    mixed = [Response(sample_id=s.id, text=t) for s, t in zip(seed, texts, strict=False)]
    score_responses(prm, seed, full)
    score_responses(prm, seed, mixed, autocast="bf16")
    flat = [x for r in full for x in r.step_scores]
    flat_mixed = [x for r in mixed for x in r.step_scores]
    assert flat_mixed != flat  # the forward ran in bf16 ...
    assert flat_mixed == pytest.approx(flat, abs=0.02)  # ... and moved the scores by its rounding only
    assert all(p.dtype == torch.float32 for p in prm.model.parameters())
    with pytest.raises(UserError, match="autocast='fp16'"):
        score_responses(prm, seed, mixed, autocast="fp16")


def test_policy_step_scores_are_the_geometric_mean_token_probability_of_each_step(seed, policy):
    from evostar.reward.prm.baselines import policy_step_scores

    model, io = policy
    texts = [s.target for s in seed[:3]]
    responses = [Response(s.id, t) for s, t in zip(seed, texts, strict=False)]
    got = policy_step_scores(model, io, seed[:3], responses, batch_size=2)
    sep = io.tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    for sample, text, scores in zip(seed, texts, got, strict=False):
        steps = split_steps(text)
        assert len(scores) == len(steps)
        prompt = io.encode_prompt(sample)
        for k, step in enumerate(steps):  # one row per step: the prefix up to it, then the step
            before: list[int] = []
            for j in range(k):
                before += io.tokenizer(steps[j], add_special_tokens=False)["input_ids"] + sep
            own = io.tokenizer(step, add_special_tokens=False)["input_ids"]
            batch = io.collate_ids([sample], [before + own], left=False)
            with torch.inference_mode():
                lp = torch.log_softmax(model(**batch).logits.float(), -1)[0]
            start = prompt["input_ids"].shape[1] + len(before)
            token_lp = [lp[start + i - 1, t] for i, t in enumerate(own)]
            assert scores[k] == pytest.approx(float(torch.stack(token_lp).mean().exp()), rel=1e-4)
