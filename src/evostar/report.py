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


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, out: Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out)
    _plt().close(fig)
    return out


def _title(summary: dict[str, Any], what: str) -> str:
    return f"{what} — evostar {summary.get('preset', summary.get('mode', ''))}, seed {summary.get('seed')}"


def plot_accuracy(summary: dict[str, Any], out: Path) -> Path:
    """Greedy accuracy and Pass@K on validation per iteration (the paper's Fig. 3), iteration 0
    being the warm-up model, Pass@K beside greedy accuracy on the same prompts, Reward-Pass@k
    where a PRM ran, and the test splits at the warm-up and at the end."""
    plt = _plt()
    iterations = summary["iterations"]
    warm = summary.get("warmup") or {}
    start = [0] if "best_val_accuracy" in warm else []
    xs = start + [r["iteration"] for r in iterations]
    greedy = ([warm["best_val_accuracy"]] if start else []) + [r["val_accuracy"] for r in iterations]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    ax.plot(xs, [100 * a for a in greedy], "o-", label="validation, greedy")
    for key, style, label in (
        ("val_greedy_on_pass_prompts", "o:", "greedy, on the Pass@K prompts"),
        ("val_pass_at_k", "s--", "validation, Pass@K"),
        ("val_reward_pass_at_k", "d-.", "validation, Reward-Pass@k (PRM)"),
    ):
        points = [(r["iteration"], r[key]) for r in iterations if r.get(key) is not None]
        same_as_greedy = key == "val_greedy_on_pass_prompts" and all(
            r.get(key) == r["val_accuracy"] for r in iterations
        )  # Pass@K on the whole split: the line would hide under the greedy one
        if points and not same_as_greedy:
            ax.plot([i for i, _ in points], [100 * p for _, p in points], style, label=label)
    acc = summary["accuracy"]
    last = xs[-1] if xs else 0
    for split, marker in zip(acc["final"], "^v<>", strict=False):
        points = ([(0, acc["warmup"][split])] if "warmup" in acc else []) + [(last, acc["final"][split])]
        ax.plot([p[0] for p in points], [100 * p[1] for p in points], marker, ms=9, label=f"{split} (test)")
    ax.set_xlabel("iteration (0: warm-up model)")
    ax.set_ylabel("accuracy (%)")
    ax.set_xticks(xs)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=7)
    ax.set_title(_title(summary, "accuracy"), fontsize=9)
    return _save(fig, out)


def plot_temperature_curves(summary: dict[str, Any], out: Path) -> Path | None:
    """Each controller run's measure per candidate temperature (the paper's Fig. 4: Reward-Pass@2
    against T over training), the chosen temperature marked; None when no controller ran."""
    runs = [r for r in summary["iterations"] if r.get("temperature_curve")]
    if not runs:
        return None
    plt = _plt()
    metrics = [("reward_pass_at_k", "Reward-Pass@k"), ("pass_at_k", "Pass@K"), ("balance", "balance score")]
    shown = [
        (k, name)
        for k, name in metrics
        if any(m.get(k) is not None for r in runs for m in r["temperature_curve"].values())
    ]
    fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 3.6), dpi=120, squeeze=False)
    colors = plt.cm.viridis([i / max(1, len(runs) - 1) for i in range(len(runs))])
    for ax, (key, name) in zip(axes[0], shown, strict=True):
        for r, color in zip(runs, colors, strict=True):
            ts = sorted(r["temperature_curve"], key=float)
            ys = [r["temperature_curve"][t][key] for t in ts]
            ax.plot(
                [float(t) for t in ts],
                [100 * y for y in ys],
                "o-",
                ms=3,
                color=color,
                label=f"before iter {r['iteration']}",
            )
            chosen = f"{r['temperature']:g}"
            if chosen in r["temperature_curve"] and r["temperature_curve"][chosen][key] is not None:
                ax.plot([r["temperature"]], [100 * r["temperature_curve"][chosen][key]], "*", ms=12, color=color)
        ax.set_xlabel("candidate temperature")
        ax.set_ylabel(f"{name} on validation (%)")
        ax.grid(alpha=0.3)
        ax.set_title(name, fontsize=9)
    axes[0][0].legend(fontsize=7, title="controller run (★ chosen)", title_fontsize=7)
    fig.suptitle(_title(summary, "temperature candidates"), fontsize=9)
    return _save(fig, out)


def plot_temperature(summary: dict[str, Any], out: Path) -> Path:
    """The sampling temperature of each iteration (the paper's Fig. 5)."""
    plt = _plt()
    its = summary["iterations"]
    fig, ax = plt.subplots(figsize=(5.2, 3.2), dpi=120)
    ax.step([r["iteration"] for r in its], [r["temperature"] for r in its], where="mid", marker="o")
    adapted = [r for r in its if r.get("adapted")]
    if adapted:
        ax.plot([r["iteration"] for r in adapted], [r["temperature"] for r in adapted], "*", ms=12, label="re-chosen")
        ax.legend(fontsize=7)
    ax.set_xlabel("iteration")
    ax.set_ylabel("sampling temperature")
    ax.set_xticks([r["iteration"] for r in its])
    ax.grid(alpha=0.3)
    ax.set_title(_title(summary, "temperature"), fontsize=9)
    return _save(fig, out)


def plot_kept(summary: dict[str, Any], out: Path) -> Path:
    """Per iteration: correct and kept responses (bars), and the share of kept responses whose
    every step is right by the gym's checker (line, right axis)."""
    plt = _plt()
    its = summary["iterations"]
    xs = [r["iteration"] for r in its]
    fig, ax = plt.subplots(figsize=(5.6, 3.4), dpi=120)
    width = 0.38
    if all("correct" in r for r in its):
        ax.bar([x - width / 2 for x in xs], [r["correct"] for r in its], width, label="correct", color="#9ecae1")
    ax.bar([x + width / 2 for x in xs], [r["kept"] for r in its], width, label="kept (trained on)", color="#3182bd")
    ax.set_xlabel("iteration")
    ax.set_ylabel("responses")
    ax.set_xticks(xs)
    share = [
        (r["iteration"], r.get("kept_steps_all_correct")) for r in its if r.get("kept_steps_all_correct") is not None
    ]
    handles, labels = ax.get_legend_handles_labels()
    if share:
        ax2 = ax.twinx()
        (line,) = ax2.plot([i for i, _ in share], [100 * v for _, v in share], "o-", color="#e6550d")
        ax2.set_ylabel("kept with every step right (%)")
        ax2.set_ylim(0, 100)
        handles.append(line)
        labels.append("kept, every step right")
    ax.legend(handles, labels, fontsize=7, loc="lower left")
    ax.set_title(_title(summary, "kept responses"), fontsize=9)
    return _save(fig, out)


def write_report(run_dir: Path, out_dir: Path | None = None) -> Path:
    """`report.md` and its plots in `out_dir` (default: `RUN_DIR/report`); returns the page."""
    summary = load_summary(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else Path(run_dir) / "report"
    if out_dir.exists() and not out_dir.is_dir():
        raise RunDirError(f"{out_dir}: --out is a file; give a folder for the page and its plots")
    plots = {
        "Accuracy over training (greedy, Pass@K, Reward-Pass@k)": plot_accuracy(summary, out_dir / "accuracy.png"),
        "Candidate temperatures at each controller run": plot_temperature_curves(
            summary, out_dir / "temperature_curves.png"
        ),
        "Sampling temperature per iteration": plot_temperature(summary, out_dir / "temperature.png"),
        "Correct and kept responses, and kept responses with every step right": plot_kept(
            summary, out_dir / "kept.png"
        ),
    }
    acc = summary["accuracy"]
    stages = list(acc)
    rows = [f"| {split} | " + " | ".join(f"{100 * acc[s][split]:.1f}" for s in stages) + " |" for split in acc["final"]]
    its = summary["iterations"]
    it_rows = [
        f"| {r['iteration']} | {r['temperature']:g} | {r['kept']} | {100 * r['val_accuracy']:.1f} | "
        + " | ".join(
            "-" if r.get(k) is None else f"{100 * r[k]:.1f}"
            for k in ("val_pass_at_k", "val_reward_pass_at_k", "kept_steps_all_correct")
        )
        + " |"
        for r in its
    ]
    lines = [
        f"# Run {run_dir}",
        "",
        "| split | " + " | ".join(stages) + " |",
        "|---" * (len(stages) + 1) + "|",
        *rows,
        "",
        "| iteration | T | kept | val greedy | val Pass@K | val Reward-Pass@k | kept, every step right |",
        "|---|---|---|---|---|---|---|",
        *it_rows,
        "",
    ]
    if summary.get("temperatures"):
        lines += [f"Temperatures chosen: {summary['temperatures']}", ""]
    for caption, path in plots.items():
        if path is not None:
            lines += [f"## {caption}", "", f"![{caption}]({path.name})", ""]
    (out_dir / "report.md").write_text("\n".join(lines))
    return out_dir / "report.md"
