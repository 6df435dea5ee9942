"""Experiment trackers: the per-iteration metrics of a run to TensorBoard and Weights & Biases,
through accelerate's tracker classes (what `Accelerator(log_with=...)` builds), so no logger of
our own. `metrics.jsonl` stays the record a run resumes from; trackers are a view of it.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterator, Mapping
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


def _leaves(data: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(key, value) of every non-mapping value, nested keys joined by `/`."""
    for key, value in data.items():
        if isinstance(value, Mapping):
            yield from _leaves(value, f"{prefix}{key}/")
        else:
            yield f"{prefix}{key}", value


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a metrics record, nested keys joined by `/` (None, text and NaN dropped)."""
    return {
        name: float(value)
        for name, value in _leaves(record)
        if isinstance(value, (int, float)) and (isinstance(value, bool) or math.isfinite(value))
    }


def hyperparameters(config: Mapping[str, Any]) -> dict[str, Any]:
    """A nested config flattened to the value types trackers take as hyperparameters."""
    return {
        name: value if value is None or isinstance(value, (bool, int, float, str)) else str(value)
        for name, value in _leaves(config)
    }


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
            tracker.store_init_configuration(hyperparameters(config))
            self.trackers.append(tracker)

    def log(self, record: Mapping[str, Any], step: int) -> None:
        values = scalars(record)
        for tracker in self.trackers:
            tracker.log(values, step=step)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []
