"""How fast does the PRM score responses, by batch size and precision, and what does bf16 change?

Scores a finished PRM run's val responses (RUN/prm/val_responses.jsonl, the run's trained PRM at
RUN/checkpoints/prm) with `score_responses` in several settings, one after another within each
repeat, after one untimed pass that fills the prompt-encoding cache (so the timings compare the
forward passes, not the image processor). Like the CLI, it keeps freed memory in the heap
(`evostar.launch.keep_freed_memory`), so the timings are what a run sees. It prints JSON:
responses/s per setting (median of the repeats), the ratios against float32 at batch 16, and
how far bf16 autocast moves the scores
from float32: the largest and the mean change of a step score, step AUROC and first-error F1
against the gym's truth in both precisions, and how many PRM top-2 picks among correct responses
stay the same.

    python benchmarks/bench_prm_score.py RUN [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

from _common import log, setup_torch

SETTINGS = (("fp32-bs16", 16, ""), ("fp32-bs32", 32, ""), ("bf16-bs16", 16, "bf16"), ("bf16-bs32", 32, "bf16"))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="run directory whose prm_eval stage finished")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    setup_torch(args.threads)

    from evostar.config import load_config
    from evostar.launch import keep_freed_memory
    from evostar.pipeline import load_data
    from evostar.prm_stages import process_measures, read_responses
    from evostar.reward.prm import load_prm, score_responses
    from evostar.select import select

    keep_freed_memory()
    cfg = load_config(args.run / "config.yaml", [])
    data = load_data(cfg)
    responses = read_responses(args.run / "prm" / "val_responses.jsonl")
    prm = load_prm(args.run / "checkpoints" / "prm")

    def scored(batch_size: int, autocast: str) -> tuple[list, float]:
        copies = [dataclasses.replace(r) for r in responses]
        t0 = time.perf_counter()
        score_responses(prm, data.val, copies, batch_size=batch_size, autocast=autocast)
        return copies, time.perf_counter() - t0

    scored(16, "")  # fills the prompt-encoding cache
    seconds: dict[str, list[float]] = {name: [] for name, _, _ in SETTINGS}
    last: dict[str, list] = {}
    for rep in range(args.repeats):
        for name, batch_size, autocast in SETTINGS:
            last[name], t = scored(batch_size, autocast)
            seconds[name].append(t)
            log(f"repeat {rep + 1} {name}: {t:.2f} s")
    rate = {name: len(responses) / statistics.median(ts) for name, ts in seconds.items()}

    full, mixed = last["fp32-bs16"], last["bf16-bs32"]
    diffs = [
        abs(a - b) for r, q in zip(full, mixed, strict=True) for a, b in zip(r.step_scores, q.step_scores, strict=True)
    ]

    def top2(rs: list) -> set:
        return {(r.sample_id, r.text) for r in select([r for r in rs if r.correct], "top_k", k=2, dedupe=False)}

    measures = {name: process_measures(last[name], cfg.seed) for name in ("fp32-bs16", "bf16-bs32")}
    result = {
        "run": str(args.run),
        "responses": len(responses),
        "threads": args.threads,
        "responses_per_s": rate,
        "ratio_vs_fp32_bs16": {name: r / rate["fp32-bs16"] for name, r in rate.items()},
        "seconds": seconds,
        "bf16_step_score_change": {"max": max(diffs, default=0.0), "mean": statistics.fmean(diffs) if diffs else 0.0},
        "step_auroc": {name: m["step_auroc_val"] for name, m in measures.items()},
        "first_error_f1": {name: m["first_error_f1_val"] for name, m in measures.items()},
        "top2_picks_same": len(top2(full) & top2(mixed)),
        "top2_picks": len(top2(full)),
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
