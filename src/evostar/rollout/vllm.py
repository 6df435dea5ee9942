"""Rollouts with vLLM (optional extra `evostar[vllm]`, CUDA GPU only).

The loop's cost is dominated by sampling K responses per prompt, which is what vLLM's paged
attention and continuous batching are built for (tests/test_vllm.py measures both backends on a
GPU). The engine is built once from a model directory; afterwards the trainer's current weights are pushed
into it once per call (`update_weights`), so the loop never re-creates it.

Weight push: the engine runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, set before it is
built unless the caller set it) and `LLM.apply_model` hands the HF state dict to the vLLM model's
own `load_weights`, which maps HF parameter names to vLLM's (the same mapping used when loading
the checkpoint from disk), so the tensors are never copied through another process. The prefix
cache holds keys/values computed with the old weights and is reset after every push.

`sync="reload"` is the fallback for models whose `load_weights` cannot take a live state dict:
each call saves the model and processor to `reload_dir` and re-creates the engine from there
(tens of seconds per call, but uses only vLLM's ordinary loading path).

Under `torchrun` / `accelerate launch` each rank builds its own engine on its own GPU with
`distributed_executor_backend="external_launcher"`, vLLM's mode for running inside an existing
torch.distributed world (what TRL's colocate mode does).

With `sleep=True` the engine frees its GPU memory between calls (level-2 sleep: weights and KV
cache are dropped, since the next call overwrites the weights anyway) so a colocated trainer gets
the memory back; the next call wakes the weights, loads the new ones, then wakes the KV cache.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from evostar.models.inputs import VLMInputs
from evostar.records import Response, Sample
from evostar.rundir import stage_seed

INSTALL_HINT = (
    "the vLLM rollout backend needs vllm and a CUDA GPU: `pip install evostar[vllm]` on a GPU "
    "machine, or use gen.backend=hf"
)


def import_vllm() -> Any:
    """Import vllm lazily, with an error that says how to get it."""
    if not torch.cuda.is_available():
        raise RuntimeError(f"no CUDA GPU: {INSTALL_HINT}")
    # in-process engine: `apply_model` then hands it tensors without a copy through another process
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        import vllm
    except ImportError as err:
        raise ImportError(INSTALL_HINT) from err
    return vllm


class VLLMGenerator:
    """K samples per prompt with vLLM; callable like `evostar.rollout.hf.generate`.

    `model_dir` is the checkpoint the engine is built from (default: the first call's
    `model.name_or_path`); it must hold the processor too. Extra keyword arguments go to
    `vllm.LLM` (e.g. `max_model_len`, `max_num_seqs`).
    """

    def __init__(
        self,
        model_dir: str | os.PathLike | None = None,
        *,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.3,
        seed: int = 0,
        sync: str = "weights",
        sleep: bool = False,
        enforce_eager: bool = False,
        reload_dir: str | os.PathLike | None = None,
        **llm_kwargs: Any,
    ) -> None:
        if sync not in ("weights", "reload"):
            raise ValueError(f"sync={sync!r}: choose weights (push the state dict) or reload (re-create)")
        self.model_dir = None if model_dir is None else str(model_dir)
        self.dtype = dtype
        self.gpu_memory_utilization = gpu_memory_utilization
        self.seed = seed
        self.sync = sync
        self.sleep = sleep
        self.enforce_eager = enforce_eager
        self.reload_dir = None if reload_dir is None else Path(reload_dir)
        self.llm_kwargs = llm_kwargs
        self.llm: Any = None
        self._asleep = False

    # -- engine ------------------------------------------------------------------------------
    def build(self, model_dir: str | os.PathLike | None = None) -> Any:
        """Create the engine (once; `sync="reload"` calls it again with the new checkpoint)."""
        vllm = import_vllm()
        path = str(model_dir or self.model_dir or "")
        if not path or not (Path(path) / "config.json").exists():
            raise FileNotFoundError(f"vLLM backend: {path!r} is not a model directory (no config.json)")
        self.close()
        kwargs = dict(self.llm_kwargs)
        seed = self.seed
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            kwargs.setdefault("distributed_executor_backend", "external_launcher")
            seed += torch.distributed.get_rank()
        self.llm = vllm.LLM(
            model=path,
            dtype=self.dtype,
            seed=seed,
            gpu_memory_utilization=self.gpu_memory_utilization,
            limit_mm_per_prompt={"image": 1},
            enable_sleep_mode=self.sleep,
            enforce_eager=self.enforce_eager,
            **kwargs,
        )
        self.model_dir = path
        self._asleep = False
        return self.llm

    def close(self) -> None:
        """Drop the engine and its GPU memory."""
        if self.llm is not None:
            self.llm = None
            import gc

            gc.collect()
            torch.cuda.empty_cache()

    def update_weights(self, weights: torch.nn.Module | Mapping[str, torch.Tensor]) -> None:
        """Load the trainer's weights (HF names) into the engine; call once per iteration."""
        if self.llm is None:
            raise RuntimeError("update_weights before build(): the engine does not exist yet")
        state = weights.state_dict() if isinstance(weights, torch.nn.Module) else weights
        items = [(name, tensor.detach()) for name, tensor in state.items()]
        if self._asleep:
            self.llm.wake_up(tags=["weights"])

        def load(model: torch.nn.Module) -> None:
            model.load_weights(iter(items))  # returns the loaded names; nothing to send back

        self.llm.apply_model(load)
        if self._asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self._asleep = False
        self.llm.reset_prefix_cache()

    # -- generation --------------------------------------------------------------------------
    def generate(
        self,
        io: VLMInputs,
        samples: Sequence[Sample],
        *,
        k: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 64,
        iteration: int = -1,
        progress: bool = True,
    ) -> list[Response]:
        """K responses per sample (greedy at temperature 0), in sample order, like the HF path.

        Each request gets its own sampling seed derived from the caller's torch seed and the
        sample id, so a resumed iteration draws the same samples.
        """
        vllm = import_vllm()
        if self.llm is None:
            self.build()
        greedy = temperature <= 0
        k = 1 if greedy else k
        base = torch.initial_seed()
        prompts, params = [], []
        for s in samples:
            prompt: dict[str, Any] = {"prompt": io.prompt_text(s)}
            if s.image is not None:
                with Image.open(s.image) as img:
                    prompt["multi_modal_data"] = {"image": img.convert("RGB")}
            prompts.append(prompt)
            params.append(
                vllm.SamplingParams(
                    n=k,
                    temperature=0.0 if greedy else temperature,
                    top_p=1.0 if greedy else top_p,
                    max_tokens=max_new_tokens,
                    stop_token_ids=list(io.stop_token_ids),
                    skip_special_tokens=True,
                    seed=stage_seed(base, "vllm", s.id),
                )
            )
        outputs = self.llm.generate(prompts, params, use_tqdm=progress) if prompts else []
        responses = []
        for s, out in zip(samples, outputs, strict=True):
            for c in sorted(out.outputs, key=lambda c: c.index):
                responses.append(
                    Response(
                        sample_id=s.id, text=c.text.strip(), temperature=max(temperature, 0.0), iteration=iteration
                    )
                )
        if self.sleep:
            self.llm.sleep(level=2)
            self._asleep = True
        return responses

    def __call__(
        self,
        model: torch.nn.Module,
        io: VLMInputs,
        samples: Sequence[Sample],
        *,
        k: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 64,
        batch_size: int = 512,
        iteration: int = -1,
        desc: str | None = None,
        progress: bool = True,
    ) -> list[Response]:
        """`rollout.hf.generate`'s signature: sync `model`'s weights once, then generate.

        `batch_size` and `desc` are accepted for compatibility; vLLM schedules its own batches.
        """
        del batch_size, desc
        if self.sync == "reload":
            self.build(self._save_for_reload(model, io))
        else:
            if self.llm is None:
                self.build(self.model_dir or getattr(model, "name_or_path", None))
            self.update_weights(model)
        return self.generate(
            io,
            samples,
            k=k,
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            iteration=iteration,
            progress=progress,
        )

    def _save_for_reload(self, model: torch.nn.Module, io: VLMInputs) -> Path:
        if self.reload_dir is None:
            import tempfile

            self.reload_dir = Path(tempfile.mkdtemp(prefix="evostar-vllm-"))
        unwrapped = getattr(model, "module", model)
        unwrapped.save_pretrained(self.reload_dir, safe_serialization=True)
        io.processor.save_pretrained(self.reload_dir)
        return self.reload_dir
