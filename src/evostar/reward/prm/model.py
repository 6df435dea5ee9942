"""The process reward model: an ordinary HF VLM checkpoint read at step tags (Math-Shepherd,
OpenRLHF).

The response is rendered after the prompt (and image) as its segments (the steps of
`split_steps`, then the `# Answer` block) joined by the step separator, with a *tag* token after
each segment::

    step 1 <tag> \\n\\n step 2 <tag> \\n\\n # Answer\\n\\n 7 <tag>

Each segment is tokenized on its own and the tag goes in as a token id, so no BPE merge can
swallow it and the text between tags is what the policy wrote. A segment's score is
P(`+`) / (P(`+`) + P(`-`)) from the language model's logits at its tag, restricted to the two
reward tokens; training puts its loss there and nowhere else (`evostar.reward.prm.train`).

The tag and reward tokens are ones the tokenizer already has as single tokens: `+`/`-`, and
the first of `TAG_CANDIDATES` that is one token (Math-Shepherd's `ки`, then rare ASCII marks,
each a single token of any byte-level BPE). A token the tokenizer lacks is added as a special
token and the embeddings resized. The choices are saved as `prm_config.json` beside the
weights, so `load_prm` restores them offline.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from evostar.errors import UserError
from evostar.models.hub import ModelLoadError, load_model_and_processor, save_model_and_processor
from evostar.models.inputs import VLMInputs
from evostar.records import ANSWER_MARKER, STEP_SEPARATOR, Sample, split_steps
from evostar.rundir import atomic_write_json, read_json

__all__ = ["PRM", "PRM_CONFIG", "TAG_CANDIDATES", "PRMTokens", "init_prm", "load_prm", "response_segments"]

PRM_CONFIG = "prm_config.json"
TAG_CANDIDATES = ("ки", "~", "@", "^", "|")


@dataclass(frozen=True)
class PRMTokens:
    """The step tag and the two reward tokens, as text and as token ids."""

    tag: str
    tag_id: int
    plus: str
    plus_id: int
    minus: str
    minus_id: int
    added: tuple[str, ...] = ()
    """Tokens added to the tokenizer for the PRM (empty when it had them all)."""


def response_segments(text: str) -> tuple[list[str], str | None]:
    """The steps of a response and its answer block (`# Answer` and what follows; None when the
    response has no block). Each gets a tag."""
    steps = split_steps(text)
    if ANSWER_MARKER not in text:
        return steps, None
    return steps, ANSWER_MARKER + text.split(ANSWER_MARKER, 1)[1].rstrip()


def _single_id(tokenizer: Any, text: str) -> int | None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


def choose_tokens(tokenizer: Any, tag: str | None = None, plus: str = "+", minus: str = "-") -> PRMTokens:
    """Pick the tag and reward tokens, adding to the tokenizer any that is not one token.

    With `tag` None the first single-token `TAG_CANDIDATES` entry is taken. Tokens the model
    reserves (image placeholders, end of turn, padding) are refused: reading a score there, or
    feeding one as a tag, would change what the model sees.
    """
    if tag is None:
        tag = next((t for t in TAG_CANDIDATES if _single_id(tokenizer, t) is not None), "<|prm_step|>")
    texts = {"tag": tag, "plus": plus, "minus": minus}
    if len(set(texts.values())) < 3:
        raise UserError(f"PRM tokens {texts}: the tag and the two reward tokens must be three different texts")
    reserved = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    added: list[str] = []
    for role, text in texts.items():
        if not text:
            raise UserError(f"PRM {role} token: empty text")
        tid = _single_id(tokenizer, text)
        if tid is not None and tid in reserved:
            raise UserError(f"PRM {role} token {text!r}: a special token the model reserves; choose another")
        if tid is None:
            added.append(text)
    if added:
        tokenizer.add_tokens(added, special_tokens=True)
    ids = {role: _single_id(tokenizer, text) for role, text in texts.items()}
    if any(i is None for i in ids.values()):
        raise UserError(f"PRM tokens {texts}: the tokenizer does not encode each as one token even after adding it")
    return PRMTokens(tag, ids["tag"], plus, ids["plus"], minus, ids["minus"], tuple(added))


class PRM:
    """A VLM with its processor, read at step tags; `score` gives P(+) per segment."""

    def __init__(
        self,
        model: torch.nn.Module,
        processor: Any,
        tokens: PRMTokens,
        *,
        prompt_template: str = "{question}",
        system_prompt: str | None = None,
    ) -> None:
        self.model = model
        self.processor = processor
        self.tokens = tokens
        self.prompt_template = prompt_template
        self.system_prompt = system_prompt
        self.io = VLMInputs(processor, prompt_template=prompt_template, system_prompt=system_prompt)
        self._sep_ids: list[int] = self.io.tokenizer(STEP_SEPARATOR, add_special_tokens=False)["input_ids"]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- rendering ---------------------------------------------------------------------------
    def response_ids(self, text: str) -> tuple[list[int], list[int], int]:
        """Token ids of a tagged response, the offsets of its tags, and how many are steps (the
        answer block's tag, when there is one, is the last)."""
        return self.responses_ids([text])[0]

    def responses_ids(self, texts: Sequence[str]) -> list[tuple[list[int], list[int], int]]:
        """`response_ids` of each text, with every segment of every text in one tokenizer call."""
        split = [response_segments(t) for t in texts]
        segments = [steps + ([answer] if answer is not None else []) for steps, answer in split]
        flat = [seg for segs in segments for seg in segs]
        encoded = iter(self.io.tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else [])
        out = []
        for (steps, _), segs in zip(split, segments, strict=True):
            ids: list[int] = []
            tags: list[int] = []
            for k in range(len(segs)):
                if k:
                    ids += self._sep_ids
                ids += next(encoded)
                tags.append(len(ids))
                ids.append(self.tokens.tag_id)
            out.append((ids, tags, len(steps)))
        return out

    def encode(
        self, samples: Sequence[Sample], texts: Sequence[str]
    ) -> tuple[dict[str, torch.Tensor], list[list[int]], list[int]]:
        """Right-padded batch, the absolute tag positions of each row, and its number of steps."""
        rendered = self.responses_ids(texts)
        batch = self.io.collate_ids(samples, [ids for ids, _, _ in rendered], left=False)
        positions = []
        for sample, (_, tags, _) in zip(samples, rendered, strict=True):
            n_prompt = self.io.encode_prompt(sample)["input_ids"].shape[1]
            positions.append([n_prompt + t for t in tags])
        return batch, positions, [n for _, _, n in rendered]

    def tag_logits(self, batch: dict[str, torch.Tensor], positions: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Per row, the (tags, 2) logits of [`-`, `+`] at its tag positions.

        Only the tag positions are projected onto the vocabulary (`logits_to_keep`)."""
        keep = sorted({p for row in positions for p in row})
        if not keep:
            return [torch.zeros(0, 2, device=self.device) for _ in positions]
        where = {p: k for k, p in enumerate(keep)}
        batch = {k: v.to(self.device) for k, v in batch.items()}
        logits = self.model(**batch, logits_to_keep=torch.tensor(keep, device=self.device)).logits
        pair = logits[..., [self.tokens.minus_id, self.tokens.plus_id]].float()
        return [pair[b, [where[p] for p in row]] for b, row in enumerate(positions)]

    @torch.inference_mode()
    def score(self, samples: Sequence[Sample], texts: Sequence[str]) -> list[tuple[list[float], float | None]]:
        """Per response: P(+) of each step, and of the answer block (None without one)."""
        self.model.eval()
        batch, positions, n_steps = self.encode(samples, texts)
        out = []
        for pair, n in zip(self.tag_logits(batch, positions), n_steps, strict=True):
            probs = torch.softmax(pair, dim=-1)[:, 1].tolist()
            out.append((probs[:n], probs[n] if len(probs) > n else None))
        return out

    # -- files -------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return {
            "tokens": asdict(self.tokens),
            "prompt_template": self.prompt_template,
            "system_prompt": self.system_prompt,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """An HF checkpoint directory plus `prm_config.json`, written to a temporary folder and
        renamed into place."""
        final = Path(path)
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save_model_and_processor(self.model, self.processor, tmp)
        atomic_write_json(tmp / PRM_CONFIG, self.config())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        return final


def init_prm(
    policy_dir: str | os.PathLike,
    *,
    tag: str | None = None,
    plus: str = "+",
    minus: str = "-",
    prompt_template: str = "{question}",
    system_prompt: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
) -> PRM:
    """A PRM initialised from a policy checkpoint: its weights and processor, plus the tokens.

    Use the policy's prompt template and system prompt, so the PRM reads prompts as the policy did.
    """
    model, processor = load_model_and_processor(
        policy_dir, dtype=dtype, device=device, trust_remote_code=trust_remote_code
    )
    tokens = choose_tokens(processor.tokenizer, tag, plus, minus)
    if tokens.added:
        model.resize_token_embeddings(len(processor.tokenizer))
    return PRM(model, processor, tokens, prompt_template=prompt_template, system_prompt=system_prompt)


def load_prm(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
) -> PRM:
    """A PRM saved by `PRM.save`, with its tag and reward tokens."""
    path = Path(path)
    cfg_path = path / PRM_CONFIG
    if not cfg_path.is_file():
        raise ModelLoadError(f"{path}: not a PRM checkpoint (no {PRM_CONFIG}); initialise one with init_prm")
    cfg = read_json(cfg_path, "PRM config")
    try:
        tokens = PRMTokens(**{**cfg["tokens"], "added": tuple(cfg["tokens"].get("added", ()))})
        prompt_template, system_prompt = cfg["prompt_template"], cfg["system_prompt"]
    except (KeyError, TypeError) as err:
        raise ModelLoadError(f"{cfg_path}: not a PRM config ({type(err).__name__}: {err}); it may be damaged") from None
    model, processor = load_model_and_processor(path, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    for text, tid in ((tokens.tag, tokens.tag_id), (tokens.plus, tokens.plus_id), (tokens.minus, tokens.minus_id)):
        if _single_id(processor.tokenizer, text) != tid:
            raise ModelLoadError(
                f"{cfg_path}: token {text!r} is not id {tid} in the saved tokenizer; it may be damaged"
            )
    return PRM(model, processor, tokens, prompt_template=prompt_template, system_prompt=system_prompt)
