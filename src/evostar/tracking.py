"""Experiment trackers: the per-iteration metrics of a run to TensorBoard and Weights & Biases,
through accelerate's tracker classes (what `Accelerator(log_with=...)` builds), so no logger of
our own. `metrics.jsonl` stays the record a run resumes from; trackers are a view of it.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from evostar.config import ConfigError

__all__ = ["Trackers", "check_trackers", "scalars", "tracker_names"]

_NEEDS = {"tensorboard": "tensorboard", "wandb": "wandb"}


def tracker_names(spec: str) -> list[str]:
    """`eval.trackers` as a list of names."""
    return [t.strip() for t in spec.split(",") if t.strip()]


def check_trackers(spec: str) -> None:
    """Refuse a tracker whose package is not installed, before any compute."""
    for name in tracker_names(spec):
        if importlib.util.find_spec(_NEEDS[name]) is None:
            raise ConfigError(
                f"eval.trackers={spec!r}: {name} is not installed (pip install {_NEEDS[name]}, or "
                "pip install 'evostar[track]' for tensorboard)",
                "eval.trackers",
            )


def scalars(record: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of a metrics record, nested keys joined by `/` (None, text and NaN dropped)."""
    out: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(scalars(value, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = float(value)
        elif isinstance(value, bool):
            out[name] = float(value)
    return out


class Trackers:
    """accelerate trackers for one run, writing under `RUN/tracking`."""

    def __init__(self, spec: str, run_dir: Path, run_name: str, config: Mapping[str, Any]) -> None:
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        self.trackers = []
        for name in tracker_names(spec):
            cls = LOGGER_TYPE_TO_CLASS[name]
            tracker = (
                cls(run_name, Path(run_dir) / "tracking")
                if cls.requires_logging_directory
                else cls(run_name, dir=str(Path(run_dir) / "tracking"))
            )
            tracker.start()
            tracker.store_init_configuration({k: v for k, v in scalars_or_text(config).items()})
            self.trackers.append(tracker)

    def log(self, record: Mapping[str, Any], step: int) -> None:
        values = scalars(record)
        for tracker in self.trackers:
            tracker.log(values, step=step)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []


def scalars_or_text(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config flattened to the value types trackers take as hyperparameters."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(scalars_or_text(value, f"{name}/"))
        elif value is None or isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = str(value)
    return out
