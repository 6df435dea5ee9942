"""Shared set-up for the benchmarks: thread settings, a cached gym and tiny model, output helpers.

Everything built here is cached under a work directory (a temp folder by default), keyed by the
sizes and seed that made it, so repeated benchmark runs time only the work being compared.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def setup_torch(threads: int) -> None:
    """Fixed intra-op threads and flushed denormals (Adam moments otherwise slow CPU steps)."""
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)


def default_workdir() -> Path:
    return Path(tempfile.gettempdir()) / "evostar-bench"


def log(msg: str) -> None:
    print(msg, flush=True)


def prepare_gym(workdir: Path, *, n_seed: int, n_train: int, seed: int) -> Path:
    """A gym with `n_seed` gold chains of thought and `n_train` answer-only prompts (cached)."""
    from evostar.data.gym import build_gym

    out = workdir / f"gym-seed{seed}-s{n_seed}-t{n_train}"
    if not (out / "train.json").exists():
        t0 = time.perf_counter()
        build_gym(out, seed=seed, n_seed=n_seed, n_train=n_train, n_val=0, n_test_id=0, n_test_ood=0)
        log(f"built gym {out} ({time.perf_counter() - t0:.1f} s)")
    return out


def prepare_tiny_model(workdir: Path, gym_dir: Path, *, seed: int) -> Path:
    """The demo's random-init tiny Qwen2-VL, its tokenizer trained on this gym's text (cached)."""
    from evostar.demo import gym_texts
    from evostar.models.tiny import build_tiny_qwen2_vl

    out = workdir / f"{gym_dir.name}-model-init"
    if not (out / "config.json").exists():
        build_tiny_qwen2_vl(gym_texts(gym_dir), out, seed=seed)
        log(f"built tiny Qwen2-VL {out}")
    return out


def load_split(gym_dir: Path, split: str, limit: int | None = None) -> list:
    from evostar.data.loaders import load_samples

    samples = load_samples(gym_dir / f"{split}.json")
    return samples[:limit] if limit is not None else samples


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A plain fixed-width table; floats get 3 significant-ish digits."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}"
        return str(v)

    cells = [[fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths, strict=True)))
    log(line)
    log("-" * len(line))
    for r in cells:
        log("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))))


def write_json(path: str | os.PathLike | None, result: dict[str, Any]) -> None:
    if path is None:
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {p}")


def machine_info() -> dict[str, Any]:
    import platform

    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }


@contextlib.contextmanager
def stock_attention(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """transformers' own sdpa attention on `model` inside the block, as a plain transformers or TRL
    user has it (evostar's loader switches CPU models to `evostar.models.attention`)."""
    from evostar.models.attention import attention_configs, use_stock_attention

    configs = list(attention_configs(model).values())
    saved = [c._attn_implementation for c in configs]
    use_stock_attention(model)
    try:
        yield model
    finally:
        for c, name in zip(configs, saved, strict=True):
            c._attn_implementation = name
