"""Monte-Carlo step labels (Math-Shepherd): does a response still reach the gold answer from
each of its step prefixes?

For a labelled sample and a response with steps s1..sn (`split_steps`), prefix i is
``s1 + "\\n\\n" + ... + si + "\\n\\n"``. N completions are sampled from it; its *hard* value is
whether any of them ends on the gold answer, its *soft* value the share that do (the loop's own
judge: `extract_answer` + `answers_match`). Two strategies choose the prefixes:

- ``every``: every prefix is estimated; step i's labels are prefix i's values.
- ``binary`` (OmegaPRM, MM-PRM): binary search for the first step whose prefix no longer reaches
  the gold answer, assuming that once a prefix fails every longer one does. Steps before it are
  positive, it and every later step negative; about log2(n + 1) estimates instead of n. Soft
  values of steps not estimated directly: a negative step gets 0.0 (its search bound, the first
  error, was estimated at exactly 0, since hard is false only when no completion succeeds); a
  positive step gets the value of the nearest estimated prefix after it (one always exists: the
  last positive step is always estimated), a lower bound when values do not rise along the
  response. `StepLabels.estimated` says which values were measured.

Every estimate of one search *round* (all prefixes for ``every``; the current midpoint of every
still-open response for ``binary``) across a whole chunk of responses goes to the completion
function as one batched call, and a (sample, prefix) pair shared by several responses, as the
first steps of a prompt's K responses often are, is estimated once per chunk.

The output directory holds one JSONL file per chunk (a fixed slice of the responses) and
``manifest.json`` with the settings and the finished chunks, each written atomically: a killed
labelling resumes at the first unfinished chunk, and resuming with other settings or other
responses is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from evostar.config import PRMStrategy
from evostar.errors import RunDirError, UserError
from evostar.records import STEP_SEPARATOR, Response, Sample, split_steps
from evostar.reward.answer import answers_match, extract_answer
from evostar.rundir import atomic_write_json, read_json, read_jsonl, stage_seed, write_jsonl

if TYPE_CHECKING:
    from evostar.models.inputs import VLMInputs

__all__ = [
    "MANIFEST",
    "STRATEGIES",
    "CompleteFn",
    "StepLabels",
    "hf_completer",
    "label_chunk",
    "label_responses",
    "prefix_text",
    "read_labels",
    "read_manifest",
    "reaches_gold",
]

MANIFEST = "manifest.json"
STRATEGIES: tuple[str, ...] = typing.get_args(PRMStrategy)


class CompleteFn(Protocol):
    """`n` continuation texts for each (sample, assistant-turn prefix) pair, in pair order.

    `evostar.rollout.hf.complete` is one (see `hf_completer`); a worker pool or vLLM can be
    another.
    """

    def __call__(self, samples: Sequence[Sample], prefixes: Sequence[str], n: int) -> list[list[str]]: ...


def hf_completer(
    model: torch.nn.Module,
    io: VLMInputs,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 64,
    batch_size: int = 512,
    progress: bool = False,
) -> CompleteFn:
    """A `CompleteFn` sampling from `model` with transformers' generate (`rollout.hf.complete`)."""
    from evostar.rollout.hf import complete

    def fn(samples: Sequence[Sample], prefixes: Sequence[str], n: int) -> list[list[str]]:
        return complete(
            model,
            io,
            samples,
            prefixes,
            n=n,
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            desc="prm labels",
            progress=progress,
        )

    return fn


@dataclass
class StepLabels:
    """Monte-Carlo labels of one response's steps (indices follow `split_steps(text)`)."""

    sample_id: str
    text: str
    hard: list[bool]
    """Per step: does its prefix still reach the gold answer (any of the N completions)?"""
    soft: list[float]
    """Per step: share of completions from its prefix that reach it (see the module for the
    values of steps that binary search did not estimate)."""
    estimated: list[bool]
    """Per step: was its prefix estimated directly (always true for `every`)?"""
    first_error: int | None
    """Index of the first negative step; None when every step is positive."""
    completions: int
    """Completions this response's estimates took (N per prefix, or what the completer returned;
    a prefix shared with another response of the chunk counts for each, though sampled once)."""
    correct: bool
    """Does the response's own final answer match the gold one (the answer block's label)?"""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StepLabels:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})


def prefix_text(steps: Sequence[str], i: int) -> str:
    """The assistant-turn text of the first `i` steps, ending with the step separator."""
    return "".join(step + STEP_SEPARATOR for step in steps[:i])


def reaches_gold(sample: Sample, prefix: str, continuation: str) -> bool:
    """Does prefix + continuation end on the gold answer, by the loop's judge?"""
    return answers_match(extract_answer(prefix + continuation), sample.answer, sample.choices)


class _Search:
    """Which prefixes of one response to estimate next, and the labels once they are known.

    Prefix numbers are 1-based (prefix i = steps 1..i). Binary search keeps `lo`..`hi`: every
    step before `lo` is positive, step `hi` negative (`hi = n + 1`: none found yet).
    """

    def __init__(self, steps: list[str], strategy: str) -> None:
        self.steps = steps
        self.strategy = strategy
        self.values: dict[int, float] = {}
        self.lo, self.hi = 1, len(steps) + 1

    def pending(self) -> list[int]:
        if self.strategy == "every":
            return [i for i in range(1, len(self.steps) + 1) if i not in self.values]
        return [(self.lo + self.hi) // 2] if self.lo < self.hi else []

    def record(self, i: int, value: float) -> None:
        self.values[i] = value
        if self.strategy == "binary":
            if value > 0:
                self.lo = i + 1
            else:
                self.hi = i

    def labels(self) -> tuple[list[bool], list[float], list[bool], int | None]:
        n = len(self.steps)
        estimated = [i in self.values for i in range(1, n + 1)]
        if self.strategy == "every":
            soft = [self.values[i] for i in range(1, n + 1)]
            hard = [v > 0 for v in soft]
            first = next((k for k, h in enumerate(hard) if not h), None)
            return hard, soft, estimated, first
        hard = [i < self.hi for i in range(1, n + 1)]
        soft = []
        for i in range(1, n + 1):
            if i in self.values:
                soft.append(self.values[i])
            elif i >= self.hi:
                soft.append(0.0)
            else:  # nearest estimated prefix after i: the search always estimates step hi - 1
                soft.append(self.values[min(j for j in self.values if i < j < self.hi)])
        return hard, soft, estimated, (self.hi - 1 if self.hi <= n else None)


def label_chunk(
    samples_by_id: Mapping[str, Sample], responses: Sequence[Response], complete: CompleteFn, *, n: int, strategy: str
) -> tuple[list[StepLabels], int]:
    """Labels of `responses`, one `complete` call per search round; and the completions spent."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r}: choose one of {list(STRATEGIES)}")
    searches = [_Search(split_steps(r.text), strategy) for r in responses]
    cost = [0] * len(responses)
    spent = 0
    cache: dict[tuple[str, str], tuple[float, int]] = {}  # (sample id, prefix) -> (share, completions)
    while True:
        asks = [(j, i) for j, s in enumerate(searches) for i in s.pending()]
        if not asks:
            break
        keys: dict[tuple[str, str], Sample] = {}
        for j, i in asks:
            key = (responses[j].sample_id, prefix_text(searches[j].steps, i))
            if key not in cache:
                keys.setdefault(key, samples_by_id[responses[j].sample_id])
        if keys:
            samples, prefixes = list(keys.values()), [p for _, p in keys]
            outs = complete(samples, prefixes, n)
            if not isinstance(outs, list) or len(outs) != len(prefixes):
                got = len(outs) if isinstance(outs, list) else type(outs).__name__
                raise ValueError(f"completion function returned {got} results for {len(prefixes)} prefixes")
            for (key, sample), conts in zip(keys.items(), outs, strict=True):
                if not conts or not all(isinstance(c, str) for c in conts):
                    raise ValueError(f"completion function returned {conts!r} for prefix {key[1]!r}: expected texts")
                cache[key] = (sum(reaches_gold(sample, key[1], c) for c in conts) / len(conts), len(conts))
                spent += len(conts)
        for j, i in asks:
            share, count = cache[(responses[j].sample_id, prefix_text(searches[j].steps, i))]
            searches[j].record(i, share)
            cost[j] += count
    out = []
    for r, s, c in zip(responses, searches, cost, strict=True):
        hard, soft, estimated, first = s.labels()
        sample = samples_by_id[r.sample_id]
        correct = answers_match(extract_answer(r.text), sample.answer, sample.choices)
        out.append(StepLabels(r.sample_id, r.text, hard, soft, estimated, first, c, correct))
    return out, spent


def _fingerprint(samples_by_id: Mapping[str, Sample], responses: Sequence[Response]) -> str:
    """What the labels depend on besides the settings: the responses and their gold answers."""
    h = hashlib.sha256()
    for r in responses:
        s = samples_by_id[r.sample_id]
        h.update(json.dumps([r.sample_id, r.text, s.answer, s.choices, s.question, s.image]).encode())
    return h.hexdigest()


def _check_inputs(samples: Sequence[Sample], responses: Sequence[Response]) -> dict[str, Sample]:
    by_id = {s.id: s for s in samples}
    for k, r in enumerate(responses):
        sample = by_id.get(r.sample_id)
        if sample is None:
            raise UserError(f"response {k}: sample_id {r.sample_id!r} is not among the {len(by_id)} samples given")
        if sample.answer is None:
            raise UserError(
                f"response {k}: sample {r.sample_id!r} has no gold answer, which Monte-Carlo step labels need"
            )
    return by_id


def chunk_path(out_dir: Path, index: int) -> Path:
    return out_dir / f"chunk_{index:05d}.jsonl"


def read_manifest(out_dir: Path) -> dict[str, Any] | None:
    """The labelling manifest of `out_dir` (settings, finished chunks, completions spent), or None."""
    path = out_dir / MANIFEST
    if not path.exists():
        return None
    manifest = read_json(path, "labelling manifest")
    if not (
        isinstance(manifest, dict)
        and isinstance(manifest.get("settings"), dict)
        and isinstance(manifest.get("done"), list)
        and all(isinstance(c, int) for c in manifest["done"])
    ):
        raise RunDirError(f'{path}: not a labelling manifest (expected {{"settings": {{...}}, "done": [chunks]}})')
    return manifest


def label_responses(
    samples: Sequence[Sample],
    responses: Sequence[Response],
    complete: CompleteFn,
    out_dir: str | Path,
    *,
    n: int = 8,
    strategy: str = "binary",
    chunk_size: int = 64,
    seed: int = 0,
    settings: Mapping[str, Any] | None = None,
) -> list[StepLabels]:
    """Label every response's steps into `out_dir`, resuming the chunks a killed run finished.

    `settings` names whatever else the labels depend on (the completer's model, temperature,
    ...): it is saved with the manifest, and a resume with different values is refused. Torch's
    global generator is seeded per chunk, so a resumed chunk draws what an uninterrupted one did.
    """
    if strategy not in STRATEGIES:
        raise UserError(f"strategy={strategy!r}: choose one of {list(STRATEGIES)}")
    if n < 1 or chunk_size < 1:
        raise UserError(f"n={n}, chunk_size={chunk_size}: both must be >= 1")
    by_id = _check_inputs(samples, responses)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"{out}: the labels directory is a file; choose a directory")
    current: dict[str, Any] = {
        "n": n,
        "strategy": strategy,
        "chunk_size": chunk_size,
        "seed": seed,
        "responses": len(responses),
        "inputs": _fingerprint(by_id, responses),
    }
    extra = json.loads(json.dumps({str(k): v for k, v in (settings or {}).items()}, default=str))
    if clash := sorted(set(extra) & set(current)):
        raise UserError(f"settings {clash}: names the labeller records itself; choose other names")
    current.update(extra)
    manifest = read_manifest(out)
    if manifest is not None and manifest["settings"] != current:
        saved = manifest["settings"]
        keys = sorted(set(saved) | set(current))
        diff = [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]
        raise RunDirError(
            f"{out / MANIFEST}: these labels were made with other settings or responses (saved -> now): "
            f"{'; '.join(diff)}. Resume with the saved ones, or label into a new directory."
        )
    # "spent": completions actually sampled per chunk (shared prefixes once)
    state = manifest or {"settings": current, "done": [], "spent": {}}
    if manifest is None:
        atomic_write_json(out / MANIFEST, state)
    for c, start in enumerate(range(0, len(responses), chunk_size)):
        if c in state["done"] and chunk_path(out, c).exists():
            continue
        torch.manual_seed(stage_seed(seed, "prm-labels", c))
        labels, spent = label_chunk(by_id, responses[start : start + chunk_size], complete, n=n, strategy=strategy)
        write_jsonl(chunk_path(out, c), [lab.to_dict() for lab in labels])
        state["done"] = sorted({*state["done"], c})
        state["spent"] = {**(state.get("spent") or {}), str(c): spent}
        atomic_write_json(out / MANIFEST, state)
    return read_labels(out)


def read_labels(out_dir: str | Path) -> list[StepLabels]:
    """All labels of a finished labelling directory, in response order."""
    out = Path(out_dir)
    manifest = read_manifest(out)
    if manifest is None:
        raise RunDirError(f"{out}: no {MANIFEST}: not a labelling directory")
    settings = manifest["settings"]
    n_chunks = -(-int(settings["responses"]) // int(settings["chunk_size"]))
    missing = [c for c in range(n_chunks) if c not in manifest["done"] or not chunk_path(out, c).exists()]
    if missing:
        raise RunDirError(f"{out}: labelling unfinished: chunks {missing} of {n_chunks} are missing; resume it")
    labels: list[StepLabels] = []
    for c in range(n_chunks):
        path = chunk_path(out, c)
        try:
            labels += [StepLabels.from_dict(d) for d in read_jsonl(path)]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise RunDirError(
                f"{path}: cannot read the labels ({type(err).__name__}: {err}); it may be damaged"
            ) from None
    if len(labels) != settings["responses"]:
        raise RunDirError(f"{out}: {len(labels)} labels for {settings['responses']} responses; it may be damaged")
    return labels
