"""Plots of a run directory (`evostar report RUN_DIR`): accuracy over training, as PNG and a
markdown page that links it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evostar.errors import RunDirError
from evostar.rundir import read_json


def load_summary(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "summary.json"
    if not Path(run_dir).is_dir():
        raise RunDirError(
            f"{run_dir}: not a run directory" if Path(run_dir).exists() else f"{run_dir}: no such directory"
        )
    if not path.exists():
        raise RunDirError(f"{run_dir}: no summary.json (the run has not finished; --resume it first)")
    summary = read_json(path, "run summary")
    if not (
        isinstance(summary, dict)
        and isinstance(summary.get("iterations"), list)
        and isinstance(summary.get("accuracy"), dict)
        and isinstance(summary["accuracy"].get("final"), dict)
    ):
        raise RunDirError(f"{path}: not an evostar summary (no accuracy per stage and iterations); it may be damaged")
    return summary


def plot_accuracy(summary: dict[str, Any], out: Path) -> Path:
    """Validation accuracy (greedy) and Pass@K per iteration, iteration 0 being the warm-up
    model, with the test splits at the warm-up and at the end."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    iterations = summary["iterations"]
    warm = summary.get("warmup") or {}
    start = [0] if "best_val_accuracy" in warm else []
    xs = start + [r["iteration"] for r in iterations]
    greedy = ([warm["best_val_accuracy"]] if start else []) + [r["val_accuracy"] for r in iterations]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    ax.plot(xs, [100 * a for a in greedy], "o-", label="validation, greedy")
    pass_k = [(r["iteration"], r["val_pass_at_k"]) for r in iterations if r.get("val_pass_at_k") is not None]
    if pass_k:
        ax.plot([i for i, _ in pass_k], [100 * p for _, p in pass_k], "s--", label="validation, Pass@K")
    acc = summary["accuracy"]
    last = xs[-1] if xs else 0
    for split, marker in zip(acc["final"], "^v<>", strict=False):
        points = ([(0, acc["warmup"][split])] if "warmup" in acc else []) + [(last, acc["final"][split])]
        ax.plot([p[0] for p in points], [100 * p[1] for p in points], marker, ms=9, label=f"{split} (test)")
    ax.set_xlabel("iteration (0: warm-up model)")
    ax.set_ylabel("accuracy (%)")
    ax.set_xticks(xs)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(f"evostar {summary.get('preset', summary.get('mode', ''))}, seed {summary.get('seed')}")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def write_report(run_dir: Path, out_dir: Path | None = None) -> Path:
    """`report.md` and its plots in `out_dir` (default: `RUN_DIR/report`); returns the page."""
    summary = load_summary(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else Path(run_dir) / "report"
    if out_dir.exists() and not out_dir.is_dir():
        raise RunDirError(f"{out_dir}: --out is a file; give a folder for the page and its plots")
    plot = plot_accuracy(summary, out_dir / "accuracy.png")
    acc = summary["accuracy"]
    stages = list(acc)
    rows = [f"| {split} | " + " | ".join(f"{100 * acc[s][split]:.1f}" for s in stages) + " |" for split in acc["final"]]
    page = "\n".join(
        [
            f"# Run {run_dir}",
            "",
            "| split | " + " | ".join(stages) + " |",
            "|---" * (len(stages) + 1) + "|",
            *rows,
            "",
            f"![accuracy over training]({plot.name})",
            "",
        ]
    )
    (out_dir / "report.md").write_text(page)
    return out_dir / "report.md"
