"""`evostar fork SRC DST key=value ...`: a new run that reuses SRC's finished stages before the
loop (base evaluation, warm-up, the PRM) and runs the loop with other settings.

Comparing selection rules, temperature controllers or iteration intervals on one seed then
costs one loop each, not one warm-up and PRM each, and every fork starts from bit-identical
weights and PRM. Only keys the shared stages do not read may change (`FORKABLE`); anything else
would make the copied stages a lie, so it is refused, naming the key.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import yaml

from evostar.config import Config, ConfigError, build_config, dump_yaml, flatten, to_dict
from evostar.context import with_added_sections
from evostar.errors import RunDirError
from evostar.rundir import atomic_write_json, atomic_write_text, read_json, read_jsonl

__all__ = ["FORKABLE", "SHARED_STAGES", "fork_run"]

SHARED_STAGES = (
    "setup",
    "base",
    "hinted",
    "warmup_curve",
    "warmup",
    "prm_collect",
    "prm_label",
    "prm_train",
    "prm_eval",
)
"""Stages before the loop, copied by a fork."""
FORKABLE = (
    "evolve.",
    "adapt.",
    "eval.",
    "gen.temperature",
    "data.unlabeled",
    "data.test",
    "prm.score_unused",
    "progress",
    "threads",
    "gen.workers",
)
"""Keys (or key prefixes) a fork may change: read only by the loop and the final evaluation, or
(threads, gen.workers) how many cores it uses, which changes the random draws, not the recipe."""
_COPIED = ("checkpoints/warmup", "checkpoints/prm", "prm")


def _forkable(key: str) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in FORKABLE)


def fork_run(src: str | Path, dst: str | Path, overrides: list[str]) -> Config:
    """Write DST: SRC's config with `overrides`, its shared stages' progress, metrics and
    checkpoints; returns the config to resume DST with."""
    src, dst = Path(src), Path(dst)
    if not (src / "progress.json").is_file() or not (src / "config.yaml").is_file():
        raise RunDirError(f"{src}: not a run directory (no progress.json and config.yaml) to fork from")
    if dst.exists() and any(dst.iterdir()):
        raise RunDirError(f"{dst}: exists and is not empty; fork into a new directory")
    saved = with_added_sections(yaml.safe_load((src / "config.yaml").read_text(encoding="utf-8")))
    before = build_config(saved, source=str(src / "config.yaml"))
    after = build_config(to_dict(before), [*overrides, f"output_dir={dst}"])
    old, new = flatten(to_dict(before)), flatten(to_dict(after))
    changed = [k for k in new if old.get(k) != new[k] and k != "output_dir"]
    refused = [k for k in changed if not _forkable(k)]
    if refused:
        raise ConfigError(
            f"fork: {refused} would change stages the fork copies from {src} (warm-up, PRM); a fork may "
            f"change only {list(FORKABLE)}. Start a new run for the others."
        )
    progress = read_json(src / "progress.json", "run's progress")
    shared = [s for s in progress.get("completed", []) if s in SHARED_STAGES]
    if "warmup" not in shared and before.warmup.steps > 0:
        raise RunDirError(f"{src}: its warm-up has not finished; nothing to share yet")
    dst.mkdir(parents=True, exist_ok=True)
    for rel in _COPIED:
        if (src / rel).exists():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(src / rel, dst / rel)
    metrics = [row for row in read_jsonl(src / "metrics.jsonl") if row.get("stage") in shared]
    atomic_write_text(dst / "metrics.jsonl", "".join(_line(row) for row in metrics))
    results: dict[str, Any] = {s: progress["results"].get(s) for s in shared}
    atomic_write_json(dst / "progress.json", {"completed": shared, "results": results, "forked_from": str(src)})
    atomic_write_text(dst / "config.yaml", dump_yaml(after))
    return after


def _line(row: dict) -> str:
    from evostar.rundir import dumps

    return dumps(row) + "\n"
