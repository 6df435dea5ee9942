"""The run directory: atomic writes, checkpoints and exact resume.

Layout::

    RUN/config.yaml            resolved config
    RUN/metrics.jsonl          one line per stage / evaluation / iteration
    RUN/samples/iter_003.jsonl generated responses of iteration 3 (with rewards)
    RUN/checkpoints/<stage>/   HF save_pretrained + trainer.pt (optimizer, scheduler) + state.json
    RUN/prm/                   the PRM stages' responses and step labels (`evostar.prm_stages`)
    RUN/progress.json          finished stages and their results, written last
    RUN/summary.json

A stage is finished once its name is in progress.json. Every file is written to a temporary
name and renamed, so a kill leaves either the old or the new version, never half a file. JSON
is strict: a number that is not finite (an empty iteration's loss) is written as null.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from evostar.errors import RunDirError

if TYPE_CHECKING:
    from accelerate import Accelerator


# --------------------------------------------------------------------------------- strict JSON
def strict(value: Any) -> Any:
    """`value` with non-finite floats as None and numpy / torch scalars as Python numbers."""
    if isinstance(value, dict):
        return {str(k): strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    if isinstance(value, (np.generic, torch.Tensor)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """JSON that every reader accepts (no NaN or Infinity)."""
    return json.dumps(strict(value), allow_nan=False, **kwargs)


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    check_writable(path)  # the rename below would replace a directory or a device
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:  # named by the path asked for, not by the temporary file
        raise RunDirError(f"{path}: cannot write there: {err.strerror or err}") from None
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # as open() would: mkstemp makes files only the owner reads
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_writable(path: str | os.PathLike) -> None:
    """Refuse, before any compute, an output file that could not be written at the end."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise RunDirError(f"{path}: exists and is not a regular file; choose a file path")
    parent = next((p for p in [path.parent, *path.parent.parents] if p.exists()), Path("/"))
    if not parent.is_dir():
        raise RunDirError(f"{path}: cannot write there: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RunDirError(f"{path}: cannot write there: {parent} is not writable")


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write_text(path, dumps(data, indent=2) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(dumps(r) + "\n" for r in rows))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_json(path: Path, what: str) -> Any:
    """A JSON file of the run directory, or a RunDirError naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunDirError(f"{path}: cannot read the {what}: {err}") from None


# --------------------------------------------------------------------------------- seeds
def stage_seed(seed: int, *names: object) -> int:
    """A seed per (run seed, stage): a resumed stage draws exactly what an uninterrupted one did."""
    h = np.random.SeedSequence([seed, *[abs(hash_str(str(n))) for n in names]])
    return int(h.generate_state(1)[0])


def hash_str(s: str) -> int:
    # Python's hash() is salted per process; resume needs a stable one.
    import zlib

    return zlib.crc32(s.encode())


# --------------------------------------------------------------------------------- the directory
def is_progress(progress: Any) -> bool:
    """Has `progress` the shape of progress.json (stage names finished, results per stage)?"""
    return (
        isinstance(progress, dict)
        and isinstance(progress.get("completed"), list)
        and all(isinstance(stage, str) for stage in progress["completed"])
        and isinstance(progress.get("results"), dict)
    )


class RunDir:
    """One run's directory: progress, metrics, checkpoints. `resume=True` continues it."""

    is_main = True

    def __init__(self, root: str | os.PathLike, resume: bool = False) -> None:
        self.root = Path(root)
        self.resume = resume
        if self.root.exists() and not self.root.is_dir():
            raise RunDirError(f"{self.root}: the run directory is a file; choose a directory")
        has_progress = (self.root / "progress.json").exists()
        if resume and not has_progress:
            state = "does not exist" if not self.root.exists() else "holds no finished stage (no progress.json)"
            raise RunDirError(f"{self.root}: nothing to resume: the directory {state}; run without --resume")
        if has_progress and not resume:
            raise RunDirError(
                f"{self.root} holds a run already: pass --resume to continue it, or choose a new output directory"
            )
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RunDirError(f"{self.root}: cannot create the run directory: {err.strerror or err}") from None
        self.progress: dict[str, Any] = {"completed": [], "results": {}}
        if resume:
            self.progress = read_json(self.root / "progress.json", "run's progress")
            if not is_progress(self.progress):
                raise RunDirError(
                    f"{self.root / 'progress.json'}: not an evostar progress file (expected "
                    '{"completed": [stage names], "results": {stage: result}}); it may be damaged'
                )
            self._truncate_metrics()

    def barrier(self) -> None:
        """Wait for every process (a no-op in one process)."""

    # -- progress ----------------------------------------------------------------------------
    def done(self, stage: str) -> bool:
        return stage in self.progress["completed"]

    def result(self, stage: str) -> Any:
        return self.progress["results"].get(stage)

    def finish(self, stage: str, result: Any = None) -> None:
        """Mark a stage finished (after its outputs and checkpoint are on disk)."""
        if stage not in self.progress["completed"]:
            self.progress["completed"].append(stage)
        self.progress["results"][stage] = strict(result)
        atomic_write_json(self.root / "progress.json", self.progress)

    # -- metrics -----------------------------------------------------------------------------
    def log(self, stage: str, **values: Any) -> None:
        line = dumps({"stage": stage, **values})
        with open(self.root / "metrics.jsonl", "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _truncate_metrics(self) -> None:
        """Drop metric lines of stages that did not finish: the resumed run writes them again (a
        line with `part_of` belongs to that stage: the temperature controller's, to its iteration)."""
        path = self.root / "metrics.jsonl"
        if not path.exists():
            return
        keep = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by the kill
            if row.get("part_of", row.get("stage")) in self.progress["completed"]:
                keep.append(line + "\n")
        atomic_write_text(path, "".join(keep))

    def metrics(self) -> list[dict]:
        path = self.root / "metrics.jsonl"
        return read_jsonl(path) if path.exists() else []

    def write_samples(self, iteration: int, rows: Iterable[dict]) -> None:
        write_jsonl(self.root / "samples" / f"iter_{iteration:03d}.jsonl", rows)

    # -- checkpoints -------------------------------------------------------------------------
    def checkpoint_dir(self, stage: str) -> Path:
        return self.root / "checkpoints" / stage

    def save_checkpoint(
        self,
        stage: str,
        model: torch.nn.Module,
        processor: Any,
        trainer_state: dict | None = None,
        state: dict | None = None,
    ) -> Path:
        """Write the checkpoint to a temporary folder, then rename it into place."""
        final = self.checkpoint_dir(stage)
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        from evostar.models.hub import save_model_and_processor

        save_model_and_processor(model, processor, tmp)
        if trainer_state is not None:
            torch.save(trainer_state, tmp / "trainer.pt")
        atomic_write_json(tmp / "state.json", state or {})
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        return final

    def load_trainer_state(self, stage: str) -> dict | None:
        path = self.checkpoint_dir(stage) / "trainer.pt"
        if not path.exists():
            return None
        try:  # our own optimizer state (tensors and plain containers only)
            return torch.load(path, weights_only=True)
        except Exception as err:
            raise RunDirError(
                f"{path}: cannot read the trainer state ({type(err).__name__}: {err}); it may be damaged"
            ) from None

    def load_state(self, stage: str) -> dict:
        path = self.checkpoint_dir(stage) / "state.json"
        state = read_json(path, "checkpoint state")
        if not isinstance(state, dict):
            raise RunDirError(f"{path}: expected a JSON object, got {type(state).__name__}; it may be damaged")
        return state

    def prune_checkpoints(self, keep: Iterable[str]) -> None:
        keep = set(keep)
        base = self.root / "checkpoints"
        if not base.exists():
            return
        for d in base.iterdir():
            if d.is_dir() and d.name not in keep:
                shutil.rmtree(d, ignore_errors=True)


class SharedRunDir(RunDir):
    """A `RunDir` every rank can use: all ranks read it and track progress in memory, rank 0
    alone writes, and ranks wait for each other around checkpoints so none reads a half-written
    one or runs ahead into the next stage while rank 0 is still saving.
    """

    def __init__(self, root: str | os.PathLike, accelerator: Accelerator, resume: bool = False) -> None:
        self.accelerator = accelerator
        self.is_main = accelerator.is_main_process
        if not self.is_main:
            # rank 0 may already be writing into root: read its state only after it has checked it
            accelerator.wait_for_everyone()
        super().__init__(root, resume=resume)
        if self.is_main:
            accelerator.wait_for_everyone()

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def finish(self, stage: str, result: Any = None) -> None:
        if self.is_main:
            super().finish(stage, result)
        else:
            if stage not in self.progress["completed"]:
                self.progress["completed"].append(stage)
            self.progress["results"][stage] = strict(result)
        self.barrier()

    def log(self, stage: str, **values: Any) -> None:
        if self.is_main:
            super().log(stage, **values)

    def write_samples(self, iteration: int, rows: Iterable[dict]) -> None:
        if self.is_main:
            super().write_samples(iteration, rows)

    def _truncate_metrics(self) -> None:
        if self.is_main:
            super()._truncate_metrics()

    def save_checkpoint(
        self,
        stage: str,
        model: torch.nn.Module,
        processor: Any,
        trainer_state: dict | None = None,
        state: dict | None = None,
    ) -> Path:
        self.barrier()
        if self.is_main:
            super().save_checkpoint(stage, model, processor, trainer_state, state)
        self.barrier()
        return self.checkpoint_dir(stage)

    def prune_checkpoints(self, keep: Any) -> None:
        if self.is_main:
            super().prune_checkpoints(keep)
        self.barrier()
