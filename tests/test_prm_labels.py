"""Monte-Carlo step labels on hand-built gym cases whose first error is known: an oracle
completer reaches the gold answer exactly from prefixes whose steps the gym's checker accepts."""

from __future__ import annotations

import json
from collections.abc import Sequence

import pytest

from evostar.data.gym import check_steps, gold_answer, gold_choices, question_text
from evostar.errors import RunDirError, UserError
from evostar.records import STEP_SEPARATOR, Response, Sample, format_response, split_steps
from evostar.reward.prm.labels import MANIFEST, StepLabels, label_chunk, label_responses, prefix_text, read_labels

N = 8


def _gym_sample(sid: str, family: str, template: str, **truth: list[int]) -> Sample:
    gym = {"family": family, "template": template, "truth": truth, "style": "id"}
    return Sample(
        id=sid, question=question_text(gym), answer=gold_answer(gym), choices=gold_choices(gym), meta={"gym": gym}
    )


ADD = _gym_sample("add", "arith", "a+b+c", digits=[8, 6, 9])  # 8 + 6 + 9 = 23
BIG = _gym_sample("big", "compare", "largest", digits=[3, 7, 2])  # (B)
READ = ["The first digit is 8.", "The second digit is 6.", "The third digit is 9."]
GOOD = READ + ["8 + 6 = 14.", "14 + 9 = 23."]
MISREAD = [READ[0], "The second digit is 5.", READ[2], "8 + 5 = 13.", "13 + 9 = 22."]  # first error: 1
BAD_SUM = READ + ["8 + 6 = 15.", "15 + 9 = 24."]  # first error: 3
LAST_WRONG = READ + ["8 + 6 = 14.", "14 + 9 = 22."]  # first error: 4


def _resp(sample: Sample, steps: Sequence[str], answer: str) -> Response:
    return Response(sample_id=sample.id, text=format_response(STEP_SEPARATOR.join(steps), answer))


CASES = [  # response, its true first error
    (_resp(ADD, GOOD, "23"), None),
    (_resp(ADD, MISREAD, "22"), 1),
    (_resp(ADD, BAD_SUM, "24"), 3),
    (_resp(ADD, LAST_WRONG, "22"), 4),
    (_resp(BIG, ["The first digit is 3.", "The second digit is 7.", "The third digit is 2."], "B"), None),
    (_resp(BIG, ["The first digit is 3.", "The second digit is 1.", "The third digit is 2."], "A"), 1),
    (_resp(ADD, ["The first digit is 0.", *GOOD[1:]], "23"), 0),  # right answer, wrong first step
    (_resp(ADD, [], "23"), None),  # no steps: nothing to estimate
]
SAMPLES = {s.id: s for s in (ADD, BIG)}


def good_share(depth: int) -> int:
    """Completions that succeed from a flawless prefix of `depth` steps (fewer the deeper, so
    every prefix's soft value differs)."""
    return max(1, N - depth)


class Oracle:
    """Deterministic completer: from a prefix the gym's checker fully accepts, `good_share`
    completions end on the gold answer, the rest on a wrong one; from any other prefix none do."""

    def __init__(self, fail_on_call: int | None = None) -> None:
        self.calls: list[list[str]] = []
        self.fail_on_call = fail_on_call

    def __call__(self, samples: Sequence[Sample], prefixes: Sequence[str], n: int) -> list[list[str]]:
        if self.fail_on_call is not None and len(self.calls) + 1 == self.fail_on_call:
            raise KeyboardInterrupt("killed")
        self.calls.append(list(prefixes))
        out = []
        for sample, prefix in zip(samples, prefixes, strict=True):
            assert prefix.endswith(STEP_SEPARATOR)
            good = good_share(len(split_steps(prefix))) if all(check_steps(sample, prefix)) else 0
            out.append([f"# Answer\n\n{sample.answer}"] * good + ["# Answer\n\n99"] * (n - good))
        return out

    @property
    def completions(self) -> int:
        return N * sum(len(c) for c in self.calls)


def _label(strategy: str) -> tuple[list[StepLabels], Oracle, int]:
    oracle = Oracle()
    labels, spent = label_chunk(SAMPLES, [r for r, _ in CASES], oracle, n=N, strategy=strategy)
    return labels, oracle, spent


def test_every_labels_each_prefix_hard_and_soft():
    labels, oracle, spent = _label("every")
    assert len(oracle.calls) == 1  # one batched call for every prefix of every response
    for lab, (r, first) in zip(labels, CASES, strict=True):
        steps = split_steps(r.text)
        assert lab.first_error == first, r.text
        assert lab.hard == [first is None or k < first for k in range(len(steps))]
        assert lab.soft == [good_share(k + 1) / N if lab.hard[k] else 0.0 for k in range(len(steps))]
        assert lab.estimated == [True] * len(steps)
        assert lab.completions == N * len(steps)
    assert [lab.correct for lab in labels] == [True, False, False, False, True, False, True, True]
    assert spent == oracle.completions < sum(lab.completions for lab in labels)  # shared prefixes once


def test_binary_search_finds_the_same_first_error_with_fewer_completions():
    every, _, _ = _label("every")
    binary, oracle, _ = _label("binary")
    for b, e, (r, first) in zip(binary, every, CASES, strict=True):
        assert b.first_error == e.first_error == first, r.text
        assert b.hard == e.hard
        n_steps = len(split_steps(r.text))
        assert b.completions <= N * (n_steps + 1).bit_length()  # about log2(steps + 1) estimates
        for k in range(n_steps):
            if b.estimated[k]:
                assert b.soft[k] == e.soft[k]
            elif not b.hard[k]:
                assert b.soft[k] == 0.0
            else:  # a positive step not estimated: the nearest estimated prefix after it
                nearest = next(j for j in range(k + 1, n_steps) if b.estimated[j])
                assert b.hard[nearest] and b.soft[k] == b.soft[nearest]
    assert sum(b.completions for b in binary) < sum(e.completions for e in every)
    # a round asks one prefix of each still-open response, all in one call
    assert len(oracle.calls) == max((len(split_steps(r.text)) + 1).bit_length() for r, _ in CASES)
    assert len(oracle.calls[0]) <= len(CASES)


def test_binary_estimates_are_the_search_path():
    """Five steps, first error at step 4 (index 3): prefixes 3, 5, 4 are estimated."""
    r = _resp(ADD, BAD_SUM, "24")
    (lab,), spent = label_chunk(SAMPLES, [r], Oracle(), n=N, strategy="binary")
    assert lab.estimated == [False, False, True, True, True]
    assert lab.hard == [True, True, True, False, False] and lab.first_error == 3
    assert lab.soft == [good_share(3) / N] * 3 + [0.0, 0.0]
    assert lab.completions == spent == 3 * N


def test_prefixes_are_the_steps_each_followed_by_the_separator():
    steps = ["a.", "b."]
    assert prefix_text(steps, 1) == "a.\n\n" and prefix_text(steps, 2) == "a.\n\nb.\n\n"
    oracle = Oracle()
    label_chunk(SAMPLES, [_resp(ADD, GOOD[:2], "23")], oracle, n=N, strategy="every")
    assert sorted(oracle.calls[0]) == [GOOD[0] + "\n\n", GOOD[0] + "\n\n" + GOOD[1] + "\n\n"]


def _responses() -> list[Response]:
    return [r for r, _ in CASES[:6]]


def test_resume_after_a_kill_does_not_redo_finished_chunks(tmp_path):
    args = (list(SAMPLES.values()), _responses())
    full = label_responses(*args, Oracle(), tmp_path / "full", n=N, chunk_size=2)
    spent = json.loads((tmp_path / "full" / MANIFEST).read_text())["spent"]

    first = Oracle()
    label_chunk(SAMPLES, _responses()[:2], first, n=N, strategy="binary")
    killed = Oracle(fail_on_call=len(first.calls) + 1)  # the first call of chunk 2 dies
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        label_responses(*args, killed, out, n=N, chunk_size=2)
    assert json.loads((out / MANIFEST).read_text())["done"] == [0]
    first_chunk = (out / "chunk_00000.jsonl").read_bytes()

    resumed = Oracle()
    labels = label_responses(*args, resumed, out, n=N, chunk_size=2)
    assert resumed.completions == spent["1"] + spent["2"]  # chunk 1 is not asked again
    assert (out / "chunk_00000.jsonl").read_bytes() == first_chunk
    assert [lab.to_dict() for lab in labels] == [lab.to_dict() for lab in full]
    assert json.loads((out / MANIFEST).read_text())["done"] == [0, 1, 2]
    assert [lab.to_dict() for lab in read_labels(out)] == [lab.to_dict() for lab in full]

    again = Oracle()  # a finished directory: nothing is recomputed
    label_responses(*args, again, out, n=N, chunk_size=2)
    assert again.calls == []


def test_resume_counts_calls_per_chunk(tmp_path):
    """With `every` each chunk is one call: a kill in chunk 2 leaves chunk 1, resumed with 2 calls."""
    out = tmp_path / "every"
    args = (list(SAMPLES.values()), _responses())
    with pytest.raises(KeyboardInterrupt):
        label_responses(*args, Oracle(fail_on_call=2), out, n=N, strategy="every", chunk_size=2)
    resumed = Oracle()
    label_responses(*args, resumed, out, n=N, strategy="every", chunk_size=2)
    assert len(resumed.calls) == 2


@pytest.mark.parametrize(
    "change, expect",
    [
        (dict(n=4), "n: 8 -> 4"),
        (dict(strategy="every"), "strategy: 'binary' -> 'every'"),
        (dict(chunk_size=3), "chunk_size: 2 -> 3"),
        (dict(settings={"temperature": 0.7}), "temperature: 1.0 -> 0.7"),
        (dict(responses=_responses()[:5]), "responses: 6 -> 5"),
    ],
)
def test_resume_with_other_settings_is_refused(tmp_path, change, expect):
    base = dict(n=N, strategy="binary", chunk_size=2, settings={"temperature": 1.0})
    label_responses(list(SAMPLES.values()), _responses(), Oracle(), tmp_path, **base)
    responses = change.pop("responses", _responses())
    with pytest.raises(RunDirError, match=str(tmp_path / MANIFEST)) as err:
        label_responses(list(SAMPLES.values()), responses, Oracle(), tmp_path, **{**base, **change})
    assert expect in str(err.value)


def test_edited_response_texts_are_refused_on_resume(tmp_path):
    label_responses(list(SAMPLES.values()), _responses(), Oracle(), tmp_path, n=N, chunk_size=2)
    edited = _responses()
    edited[2] = Response(sample_id=edited[2].sample_id, text=edited[2].text.replace("15", "16"))
    with pytest.raises(RunDirError, match="inputs"):
        label_responses(list(SAMPLES.values()), edited, Oracle(), tmp_path, n=N, chunk_size=2)


def test_bad_input_is_refused_before_any_completion(tmp_path):
    oracle = Oracle()
    unknown = [Response(sample_id="nope", text="x")]
    with pytest.raises(UserError, match="response 0: sample_id 'nope'"):
        label_responses([ADD], unknown, oracle, tmp_path / "a")
    unlabeled = Sample(id="u", question="q")
    with pytest.raises(UserError, match="response 0: sample 'u' has no gold answer"):
        label_responses([unlabeled], [Response(sample_id="u", text="a.\n\nb.")], oracle, tmp_path / "b")
    with pytest.raises(UserError, match="strategy='all'"):
        label_responses([ADD], [CASES[0][0]], oracle, tmp_path / "c", strategy="all")
    with pytest.raises(UserError, match=r"settings \['n'\]: names the labeller records itself"):
        label_responses([ADD], [CASES[0][0]], oracle, tmp_path / "e", settings={"n": 3})
    assert oracle.calls == []
    with pytest.raises(RunDirError, match="not a labelling directory"):
        read_labels(tmp_path / "d")


def test_a_completer_returning_the_wrong_shape_is_named():
    def short(samples, prefixes, n):
        return [["# Answer\n\n23"]] * (len(prefixes) - 1)

    with pytest.raises(ValueError, match="returned 0 results for 1 prefixes"):
        label_chunk(SAMPLES, [_resp(ADD, GOOD[:1], "23")], short, n=N, strategy="every")
