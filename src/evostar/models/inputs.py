"""Turn samples into model inputs: one path for generation and training, any HF VLM.

The processor's chat template renders the prompt; the processor encodes it with its image once
per sample (cached, since every iteration re-reads the same prompts). Responses are tokenized on
their own and appended, so the prompt and image tokens are masked from the loss exactly.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from PIL import Image
from transformers import ProcessorMixin

from evostar.records import Sample

# Keys that run along the token axis and must be padded; every other processor output is
# per-image and is concatenated along its first axis (Qwen2-VL patches, LLaVA/Idefics pixels).
SEQUENCE_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids", "labels")
IGNORE_INDEX = -100


class VLMInputs:
    """Prompt rendering, encoding and batching for one processor."""

    def __init__(
        self,
        processor: ProcessorMixin,
        prompt_template: str = "{question}",
        system_prompt: str | None = None,
        cache_size: int = 100_000,
    ) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.prompt_template = prompt_template
        self.system_prompt = system_prompt
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple, dict[str, torch.Tensor]] = OrderedDict()
        self._response_cache: OrderedDict[str, list[int]] = OrderedDict()
        self._image_tokens: dict[tuple[int, int], int] = {}
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id
        self.turn_end = self._find_turn_end()
        self.turn_end_ids: list[int] = self.tokenizer(self.turn_end, add_special_tokens=False)["input_ids"]
        stop = {i for i in self.turn_end_ids[:1]}
        if self.tokenizer.eos_token_id is not None:
            stop.add(self.tokenizer.eos_token_id)
        self.stop_token_ids = sorted(stop)

    # -- prompts -----------------------------------------------------------------------------
    def messages(self, sample: Sample, response: str | None = None) -> list[dict]:
        content: list[dict] = []
        if sample.image is not None:
            content.append({"type": "image"})
        question = self.prompt_template.format(question=sample.question)
        content.append({"type": "text", "text": question})
        messages = [{"role": "user", "content": content}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        if response is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": response}]})
        return messages

    def prompt_text(self, sample: Sample) -> str:
        return self.processor.apply_chat_template(self.messages(sample), add_generation_prompt=True, tokenize=False)

    def _find_turn_end(self) -> str:
        """What the chat template writes after an assistant message (e.g. `<|im_end|>`)."""
        probe = Sample(id="probe", question="q")
        marker = "XYZZY"
        prompt = self.prompt_text(probe)
        full = self.processor.apply_chat_template(
            self.messages(probe, marker), add_generation_prompt=False, tokenize=False
        )
        if not full.startswith(prompt):
            # Templates that rewrite earlier turns: fall back to the tokenizer's end-of-sequence.
            return self.tokenizer.eos_token or ""
        suffix = full[len(prompt) :].split(marker, 1)[-1]
        return suffix.rstrip("\n") or (self.tokenizer.eos_token or "")

    def encode_prompt(self, sample: Sample) -> dict[str, torch.Tensor]:
        # Keyed by what is encoded, not by id alone: two data files may reuse ids ("1", "2", ...).
        key = (sample.id, sample.image, sample.question)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        text = self.prompt_text(sample)
        kwargs: dict = {"text": [text], "return_tensors": "pt"}
        if sample.image is not None:
            with Image.open(sample.image) as img:
                kwargs["images"] = [img.convert("RGB")]
        enc = dict(self.processor(**kwargs))
        self._remember(self._cache, key, enc)
        return enc

    def prompt_length(self, sample: Sample) -> int:
        """Tokens of the encoded prompt, image tokens included, without encoding every image:
        what an image adds is measured once per image size (and checks the processor takes it)."""
        n_text = len(self.tokenizer(self.prompt_text(sample), add_special_tokens=False)["input_ids"])
        if sample.image is None:
            return n_text
        with Image.open(sample.image) as img:
            size = img.size  # read from the header; the pixels load only for a new size
            if size not in self._image_tokens:
                probe = Sample(id="probe", question="x", image=sample.image)
                text = self.prompt_text(probe)
                enc = self.processor(text=[text], images=[img.convert("RGB")], return_tensors="pt")
                base = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
                self._image_tokens[size] = int(enc["input_ids"].shape[1]) - base
        return n_text + self._image_tokens[size]

    def encode_response(self, text: str) -> list[int]:
        """Token ids of a response and the end of turn (cached: warm-up revisits the same gold
        chains of thought every epoch, and a prompt's K samples repeat texts)."""
        ids = self._response_cache.get(text)
        if ids is None:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] + self.turn_end_ids
            self._remember(self._response_cache, text, ids)
        return list(ids)

    def _remember(self, cache: OrderedDict, key: object, value: object) -> None:
        """Keep `value` in a cache of at most `cache_size` entries (oldest out first)."""
        if self.cache_size > 0:
            cache[key] = value
            if len(cache) > self.cache_size:
                cache.popitem(last=False)

    # -- batches -----------------------------------------------------------------------------
    def collate_prompts(self, samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
        """Left-padded prompt batch for generation."""
        return self._collate([self.encode_prompt(s) for s in samples], left=True)

    def collate_sft(self, samples: Sequence[Sample], responses: Sequence[str]) -> dict[str, torch.Tensor]:
        """Right-padded prompt+response batch with loss on response tokens only."""
        rows = []
        for sample, response in zip(samples, responses, strict=True):
            enc = self.encode_prompt(sample)
            resp = torch.tensor([self.encode_response(response)], dtype=torch.long)
            row = dict(enc)
            n_prompt = enc["input_ids"].shape[1]
            row["input_ids"] = torch.cat([enc["input_ids"], resp], dim=1)
            row["attention_mask"] = torch.ones_like(row["input_ids"])
            for key in ("mm_token_type_ids", "token_type_ids"):
                if key in enc:
                    row[key] = torch.cat([enc[key], torch.zeros_like(resp)], dim=1)
            labels = row["input_ids"].clone()
            labels[:, :n_prompt] = IGNORE_INDEX
            row["labels"] = labels
            rows.append(row)
        return self._collate(rows, left=False)

    def _collate(self, rows: list[dict[str, torch.Tensor]], left: bool) -> dict[str, torch.Tensor]:
        batch: dict[str, torch.Tensor] = {}
        width = max(r["input_ids"].shape[1] for r in rows)
        for key in rows[0]:
            if key in SEQUENCE_KEYS:
                fill = {"input_ids": self.pad_id, "labels": IGNORE_INDEX}.get(key, 0)
                padded = []
                for r in rows:
                    t = r[key]
                    pad = t.new_full((t.shape[0], width - t.shape[1]), fill)
                    padded.append(torch.cat([pad, t] if left else [t, pad], dim=1))
                batch[key] = torch.cat(padded, dim=0)
            else:
                batch[key] = _cat_padded([r[key] for r in rows])
        return batch

    def collate_ids(
        self, samples: Sequence[Sample], response_ids: Sequence[Sequence[int]], *, left: bool
    ) -> dict[str, torch.Tensor]:
        """Prompts with given assistant-turn token ids appended (no end of turn, no labels), for
        callers that build the response tokens themselves: left-padded to continue a response
        prefix, right-padded to read a score at known positions."""
        rows = []
        for sample, ids in zip(samples, response_ids, strict=True):
            enc = self.encode_prompt(sample)
            resp = torch.tensor([list(ids)], dtype=torch.long).reshape(1, -1)
            row = dict(enc)
            row["input_ids"] = torch.cat([enc["input_ids"], resp], dim=1)
            row["attention_mask"] = torch.ones_like(row["input_ids"])
            for key in ("mm_token_type_ids", "token_type_ids"):
                if key in enc:
                    row[key] = torch.cat([enc[key], torch.zeros_like(resp)], dim=1)
            rows.append(row)
        return self._collate(rows, left=left)


def _cat_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate along dim 0, zero-padding dim 1 when per-sample image counts differ."""
    if tensors[0].dim() >= 2 and len({t.shape[1:] for t in tensors}) > 1:
        tail = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
        out = []
        for t in tensors:
            pad_t = t.new_zeros((t.shape[0], *tail))
            pad_t[(slice(None), *[slice(0, s) for s in t.shape[1:]])] = t
            out.append(pad_t)
        tensors = out
    return torch.cat(tensors, dim=0)
