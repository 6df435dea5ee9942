"""What every stage of a run shares: the config, the run directory, the processor and prompt
encoder, the device, the accelerator (several processes) and the rollout backend."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

from evostar.config import AdaptConfig, Config, PRMConfig, build_config, dump_yaml, resume_conflicts, to_dict
from evostar.errors import RunDirError
from evostar.launch import maybe_accelerator, resolve_device
from evostar.models.hub import load_processor
from evostar.models.inputs import VLMInputs
from evostar.records import Response, Sample
from evostar.rollout import make_rollout
from evostar.rollout.sharded import generate_sharded
from evostar.rundir import RunDir, SharedRunDir, atomic_write_text, is_progress, read_json

if TYPE_CHECKING:
    from accelerate import Accelerator

    from evostar.tracking import Trackers


@dataclass
class RunContext:
    cfg: Config
    run: RunDir
    io: VLMInputs
    device: torch.device
    accelerator: Accelerator | None
    backend: Callable[..., list[Response]]
    """Sampling: transformers `generate`, the CPU worker pool or a vLLM engine (built on first use)."""
    say: Callable[[str], None]
    trackers: Trackers | None = None
    """accelerate's trackers (eval.trackers), on the main process only."""

    def track(self, record: dict[str, Any], step: int) -> None:
        """A metrics record to the trackers, if any."""
        if self.trackers is not None:
            self.trackers.log(record, step)

    @property
    def processor(self) -> Any:
        return self.io.processor

    @property
    def main(self) -> bool:
        """This process writes files and prints (rank 0, or the only process)."""
        return self.run.is_main

    @property
    def rollout(self) -> Callable[..., list[Response]]:
        """The backend, sharded across processes when there are several."""
        if self.accelerator is None:
            return self.backend
        return functools.partial(generate_sharded, self.accelerator, generate_fn=self.backend)

    def sample(
        self,
        model: torch.nn.Module,
        prompts: Sequence[Sample],
        temperature: float,
        *,
        seed: int,
        it: int,
        k: int | None = None,
    ) -> list[Response]:
        """`k` (default `gen.k`) responses per prompt at `temperature`, from `seed`, so a resumed
        run draws the same ones; `it` tags them with the iteration."""
        gen = self.cfg.gen
        torch.manual_seed(seed)
        return self.rollout(
            model,
            self.io,
            prompts,
            k=gen.k if k is None else k,
            temperature=temperature,
            top_p=gen.top_p,
            max_new_tokens=gen.max_new_tokens,
            batch_size=gen.batch_size,
            iteration=it,
            desc=f"iter {it} generate",
            progress=self.cfg.progress,
        )

    def close(self) -> None:
        """Free what the backend holds (a vLLM engine's GPU memory, a CPU pool's processes)."""
        if hasattr(self.backend, "close"):
            self.backend.close()
        if self.trackers is not None:
            self.trackers.close()
            self.trackers = None


def prompt_encoder(cfg: Config) -> VLMInputs:
    """The model's processor with the run's prompt template and system turn."""
    processor = load_processor(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    return VLMInputs(processor, cfg.model.prompt_template, cfg.model.system_prompt or None)


def open_run(cfg: Config, resume: bool = False, console: Any = None, io: VLMInputs | None = None) -> RunContext:
    """Threads, processes, the run directory (checked against a resumed run's config) and the
    prompt encoder (`io`, loaded when not given): everything a stage needs but the model and
    the data."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if not cfg.progress:  # transformers' own bars (loading and writing weights) too
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    # Tiny gradients and Adam moments decay into denormal floats, which run many times slower on CPU.
    torch.set_flush_denormal(True)
    accelerator = maybe_accelerator(cfg)  # None on one process
    main = accelerator is None or accelerator.is_main_process
    cfg.progress = cfg.progress and main
    if resume:
        check_same_run(Path(cfg.output_dir), cfg)  # before the run directory is touched
    run = (
        SharedRunDir(cfg.output_dir, accelerator, resume=resume)
        if accelerator
        else RunDir(cfg.output_dir, resume=resume)
    )
    if main:
        atomic_write_text(run.root / "config.yaml", dump_yaml(cfg))
    device = accelerator.device if accelerator else resolve_device(cfg.device)
    io = io or prompt_encoder(cfg)
    say = console.print if console is not None and main else (lambda *a, **k: None)
    trackers = None
    if cfg.eval.trackers and main:
        from evostar.tracking import Trackers

        trackers = Trackers(cfg.eval.trackers, run.root, run.root.name, to_dict(cfg))
    return RunContext(cfg, run, io, device, accelerator, make_rollout(cfg), say, trackers)


ADDED_SECTIONS: dict[str, Callable[[], dict[str, Any]]] = {
    "prm": lambda: to_dict(PRMConfig()),
    "adapt": lambda: to_dict(AdaptConfig()),
}
"""Sections added to `Config` after runs were saved without them, with the values that reproduce
what those runs did (the PRM off, a static temperature)."""


def with_added_sections(data: Any) -> Any:
    """A saved config dict with every section in `ADDED_SECTIONS` it predates filled in; any other
    missing key is left missing (a damaged file, refused)."""
    if not isinstance(data, dict):
        return data
    return {**data, **{name: make() for name, make in ADDED_SECTIONS.items() if name not in data}}


def check_same_run(root: Path, cfg: Config) -> None:
    """Refuse to resume with a config whose results would differ from the saved run's."""
    path = root / "config.yaml"
    if not path.exists():
        progress = root / "progress.json"
        saved_progress = read_json(progress, "run's progress") if progress.exists() else {}
        finished = saved_progress.get("completed", []) if is_progress(saved_progress) else []
        if set(finished) - {"setup"}:  # the demo's setup stage comes before the config is written
            raise RunDirError(f"{path} is missing, so --resume cannot check it continues the same run")
        return  # killed before its config was written: nothing was computed yet
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except Exception as err:
        raise RunDirError(f"{path}: cannot read the resumed run's config: {err}") from None
    data = with_added_sections(data)
    # the run saved every key (dump_yaml): anything less is a damaged file, not the defaults
    if not isinstance(data, dict) or set(data) != {f.name for f in dataclasses.fields(Config)}:
        raise RunDirError(f"{path}: not the config evostar saved for this run (keys missing); it may be damaged")
    try:
        saved = build_config(data, source=str(path))
    except Exception as err:
        raise RunDirError(f"{path}: cannot read the resumed run's config: {err}") from None
    conflicts = resume_conflicts(saved, cfg)
    if conflicts:
        raise RunDirError(
            f"{root}: --resume continues a run with the config it started with, and these keys "
            f"differ (saved -> now): {'; '.join(conflicts)}. Resume with the saved values "
            f"({path}), or start a new output directory."
        )
