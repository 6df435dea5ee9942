"""Rollout backends: transformers `generate` ("hf", CPU or GPU) and vLLM ("vllm", GPU only).

Both are callables with the signature of `evostar.rollout.hf.generate`
(`fn(model, io, samples, *, k, temperature, top_p, max_new_tokens, batch_size, iteration, desc,
progress) -> list[Response]`, K responses per sample in sample order), so the loop and
`distributed.generate_sharded` take either. On CPU the hf backend can sample in several
single-thread processes over a bf16 copy of the weights (`evostar.rollout.pool`). Imports are
lazy: `import evostar.rollout` never imports vllm.
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from typing import Any

from evostar.config import Backend
from evostar.records import Response

BACKENDS: tuple[str, ...] = typing.get_args(Backend)


def make_rollout(cfg: Any) -> Callable[..., list[Response]]:
    """The sampling callable a run's config asks for (`cfg`: `evostar.config.Config`).

    Stateful backends (a vLLM engine, a worker pool) have a `close()`; call it when done.
    """
    gen = cfg.gen
    if gen.backend == "hf" and (gen.workers > 1 or gen.rollout_dtype):
        from evostar.rollout.pool import RolloutPool

        return RolloutPool(
            cfg.model.path,
            workers=gen.workers,
            dtype=gen.rollout_dtype or cfg.model.dtype,
            prompt_template=cfg.model.prompt_template,
            system_prompt=cfg.model.system_prompt or None,
            trust_remote_code=cfg.model.trust_remote_code,
        )
    if gen.backend == "hf":
        return get_backend("hf")
    return get_backend(gen.backend, model_dir=cfg.model.path, seed=cfg.seed)


def get_backend(name: str, **options: Any) -> Callable[..., list[Response]]:
    """The generate callable for `name`; `options` go to `VLLMGenerator` (vllm only).

    The vLLM backend is a stateful object (one engine, weights pushed on every call): get it once
    per run, not once per iteration.
    """
    if name == "hf":
        if options:
            raise ValueError(f"the hf backend takes no options, got {sorted(options)}")
        from evostar.rollout.hf import generate

        return generate
    if name == "vllm":
        from evostar.rollout.vllm import VLLMGenerator

        return VLLMGenerator(**options)
    raise ValueError(f"unknown rollout backend {name!r}; choose one of {BACKENDS}")


__all__ = ["BACKENDS", "get_backend", "make_rollout"]
