"""CPU rollouts split across single-thread processes that share one copy of the weights.

Why: a tiny model's decode step is a chain of small kernels that intra-op threads barely share,
so single-thread processes side by side sample faster than one process with all threads, and a
bf16 copy uses the CPU's bf16 matrix units where it has them (AVX-512 BF16 / AMX).
benchmarks/bench_rollout.py measures it.

`RolloutPool` keeps the sampling weights (in `dtype`) in shared memory. Every call first copies the
trainer's current weights into them (once per iteration, like a vLLM engine's weight push), then
this process and `workers - 1` spawned ones each sample a contiguous shard of the prompts with a
seed drawn from torch's global generator, so a seeded call gives the same responses every time.
It is callable like `evostar.rollout.hf.generate`. Greedy evaluation does not use it: accuracy is
always measured on the policy itself.

Workers are spawned (fork is unsafe with torch's threads), so they import the main module: a
script that starts a run must keep that under `if __name__ == "__main__":` (the CLI does).
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Sequence
from typing import Any

import torch

from evostar.models.inputs import VLMInputs
from evostar.records import Response, Sample

_POLL_SECONDS = 1.0


def _plain_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights an ordinary HF model of this checkpoint has (LoRA adapters merged in)."""
    from evostar.models.lora import has_adapters, merge_adapters

    unwrapped = getattr(model, "module", model)
    if has_adapters(unwrapped):
        unwrapped = merge_adapters(unwrapped, copy_model=True)
    return unwrapped.state_dict()


def _build_sampler(model_dir: str, dtype: torch.dtype, state: dict[str, torch.Tensor], trust_remote_code: bool):
    """A model of `model_dir`'s architecture whose tensors are `state`'s (no copy)."""
    from transformers import AutoConfig

    from evostar.models.attention import use_cpu_attention
    from evostar.models.hub import auto_model_class

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    model = auto_model_class(config, trust_remote_code).from_config(
        config, trust_remote_code=trust_remote_code, dtype=dtype
    )
    model.load_state_dict(state, strict=True, assign=True)
    model.generation_config = model.generation_config.from_pretrained(model_dir)
    use_cpu_attention(model)
    return model.eval()


def _worker(model_dir: str, dtype_name: str, io_args: dict[str, Any], trust_remote_code: bool, conn) -> None:
    """Loop of a spawned sampler: receive (samples, kwargs, seed), send back texts."""
    from evostar.launch import keep_freed_memory
    from evostar.models.hub import load_processor
    from evostar.rollout.hf import generate

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    keep_freed_memory()
    parent = os.getppid()
    try:
        state = conn.recv()
        model = _build_sampler(model_dir, getattr(torch, dtype_name), state, trust_remote_code)
        io = VLMInputs(load_processor(model_dir, trust_remote_code=trust_remote_code), **io_args)
        conn.send(("ready", None))
    except Exception:
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        while not conn.poll(_POLL_SECONDS):
            if os.getppid() != parent:  # the run was killed: do not outlive it
                return
        message = conn.recv()
        if message is None:
            return
        samples, kwargs, seed = message
        try:
            torch.manual_seed(seed)
            responses = generate(model, io, samples, progress=False, **kwargs)
            conn.send(("ok", [r.text for r in responses]))
        except Exception:
            conn.send(("error", traceback.format_exc()))


class RolloutPool:
    """Sampling on CPU in `workers` single-thread processes over shared `dtype` weights."""

    def __init__(
        self,
        model_dir: str | os.PathLike,
        *,
        workers: int = 2,
        dtype: str = "bfloat16",
        prompt_template: str = "{question}",
        system_prompt: str | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        self.model_dir = str(model_dir)
        self.workers = workers
        self.dtype = getattr(torch, dtype)
        self.io_args = {"prompt_template": prompt_template, "system_prompt": system_prompt}
        self.trust_remote_code = trust_remote_code
        self.shared: dict[str, torch.Tensor] | None = None
        self.sampler: torch.nn.Module | None = None
        self.processes: list = []
        self.pipes: list = []

    # -- weights -------------------------------------------------------------------------------
    def _start(self, model: torch.nn.Module) -> None:
        """Shared tensors shaped like `model`'s weights, this process's sampler and the workers."""
        shared: dict[str, torch.Tensor] = {}
        by_storage: dict[int, torch.Tensor] = {}  # tied weights (embeddings / LM head) stay tied
        for name, tensor in _plain_state_dict(model).items():
            key = tensor.untyped_storage().data_ptr()
            if key not in by_storage:
                by_storage[key] = torch.empty(tensor.shape, dtype=self.dtype).share_memory_()
            shared[name] = by_storage[key]
        self.shared = shared
        self.update_weights(model)
        self.sampler = _build_sampler(self.model_dir, self.dtype, shared, self.trust_remote_code)
        if self.workers > 1:
            import torch.multiprocessing as mp

            ctx = mp.get_context("spawn")
            for _ in range(self.workers - 1):
                parent_end, child_end = ctx.Pipe()
                proc = ctx.Process(
                    target=_worker,
                    args=(
                        self.model_dir,
                        str(self.dtype).removeprefix("torch."),
                        self.io_args,
                        self.trust_remote_code,
                        child_end,
                    ),
                    daemon=True,
                )
                proc.start()
                child_end.close()  # only the worker holds it now: its death reads as EOF here
                try:
                    parent_end.send(shared)
                except OSError:
                    pass  # it died at start-up: _receive below says so
                self.processes.append(proc)
                self.pipes.append(parent_end)
            for pipe, proc in zip(self.pipes, self.processes, strict=True):
                self._receive(pipe, proc)

    @torch.no_grad()
    def update_weights(self, model: torch.nn.Module) -> None:
        """Copy the trainer's current weights into the shared sampling copy."""
        assert self.shared is not None
        for name, tensor in _plain_state_dict(model).items():
            self.shared[name].copy_(tensor)

    def _receive(self, pipe, proc) -> Any:
        try:
            while not pipe.poll(_POLL_SECONDS):
                if not proc.is_alive():
                    raise EOFError
            status, payload = pipe.recv()
        except (EOFError, OSError):  # closed or reset: the worker is gone
            proc.join(timeout=5)
            raise RuntimeError(
                f"rollout worker (pid {proc.pid}) died with exit code {proc.exitcode}: see its output "
                'above (a script that starts a run needs an `if __name__ == "__main__":` guard, '
                "since workers are spawned and import the main module)"
            ) from None
        if status == "error":
            raise RuntimeError(f"rollout worker failed:\n{payload}")
        return payload

    # -- sampling ------------------------------------------------------------------------------
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
        """`rollout.hf.generate`'s signature: push `model`'s weights, then sample in parallel."""
        from evostar.rollout.hf import generate
        from evostar.rollout.sharded import shard_bounds

        if next(model.parameters()).device.type != "cpu":
            raise ValueError("the rollout pool samples on CPU; on a GPU use gen.workers=1 or gen.backend=vllm")
        seeds = torch.randint(0, 2**62, (self.workers,)).tolist()  # from the caller's seeded RNG
        if self.sampler is None:
            with torch.random.fork_rng(devices=[]):  # building models draws random init weights
                self._start(model)
        else:
            self.update_weights(model)
        shards = [shard_bounds(len(samples), self.workers, r) for r in range(self.workers)]
        kwargs = dict(
            k=k,
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            iteration=iteration,
        )
        for pipe, (start, stop), seed in zip(self.pipes, shards[1:], seeds[1:], strict=True):
            try:
                pipe.send((list(samples[start:stop]), kwargs, seed))
            except OSError:
                pass  # a dead worker: _receive below says so
        threads = torch.get_num_threads()
        if self.workers > 1:
            torch.set_num_threads(1)  # the other core is a worker's
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seeds[0])
                start, stop = shards[0]
                label = f"{desc or 'generate'} (1/{self.workers} shards)" if self.workers > 1 else desc
                own = generate(self.sampler, io, list(samples[start:stop]), desc=label, progress=progress, **kwargs)
        finally:
            torch.set_num_threads(threads)
        responses = own
        for pipe, proc, (start, _) in zip(self.pipes, self.processes, shards[1:], strict=True):
            texts = self._receive(pipe, proc)
            per_sample = k if temperature > 0 else 1
            for j, text in enumerate(texts):
                sample = samples[start + j // per_sample]
                responses.append(
                    Response(sample_id=sample.id, text=text, temperature=max(temperature, 0.0), iteration=iteration)
                )
        return responses

    def close(self) -> None:
        for pipe in self.pipes:
            try:
                pipe.send(None)
            except (BrokenPipeError, OSError):
                pass
        for proc in self.processes:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
        self.processes, self.pipes = [], []
        self.sampler = self.shared = None

    def __del__(self) -> None:  # a run that ends without close() must not leave workers behind
        try:
            self.close()
        except Exception:
            pass
