"""Ablation rows in parallel processes or one after another: which is faster on this machine?

`evostar ablate` runs the loop rows of a seed one after another, each with all the machine's
threads and the demo's rollout pool (`gen.workers` single-thread sampler processes). The
alternative is one process per row with one thread and one sampler each. This script forks the
same shared run (an ablation's `seedN/shared`) into the same rows both ways and times them:

* sequential: the rows one after another, each as `evostar fork SHARED DST ...` with the shared
  run's own threads and workers (what `evostar ablate` does);
* parallel: the rows started at once, one process each, `threads=1 gen.workers=1`.

Both ways run the same rows, loop and data; the parallel one samples with one worker, so its
draws (not its recipe) differ from the sequential one's, and its accuracies are printed beside
them for that reason only.

    evostar ablate --preset quick --seeds 1 --out /tmp/ab_q     # makes /tmp/ab_q/seed0/shared
    python benchmarks/bench_ablate_parallel.py --shared /tmp/ab_q/seed0/shared --preset quick \
        --rows continuous_25,random2 --out parallel.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import log, machine_info, print_table, ratio, write_json


def fork_command(shared: Path, dst: Path, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "evostar.cli", "fork", str(shared), str(dst), *overrides, "progress=false"]


def final(dst: Path) -> dict[str, float]:
    summary = json.loads((dst / "summary.json").read_text())
    tests = summary["accuracy"]["final"]
    return {"test_id": 100 * tests["test_id"], "test_ood": 100 * tests["test_ood"]}


def run_all(commands: list[list[str]], parallel: bool, logs: Path) -> float:
    """Seconds from the first start to the last exit; a failing command stops the benchmark."""
    t0 = time.perf_counter()
    procs: list[tuple[subprocess.Popen, Path]] = []
    for i, cmd in enumerate(commands):
        log_path = logs / f"{'par' if parallel else 'seq'}{i}.log"
        with log_path.open("w") as fh:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
        procs.append((proc, log_path))
        if not parallel:
            proc.wait()
    for proc, log_path in procs:
        if proc.wait() != 0:
            raise SystemExit(f"{' '.join(proc.args)} failed; its output: {log_path}")
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from evostar.ablate import _BY_NAME, SIDE_BY_SIDE, check_rows, row_overrides

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", type=Path, required=True, help="an ablation's seedN/shared run directory")
    ap.add_argument("--preset", default="quick", help="the ablation preset that made --shared")
    ap.add_argument("--rows", default="continuous_25,random2", help="loop rows to run, comma-separated")
    ap.add_argument("--workdir", type=Path, default=None, help="where the forks go (a temp folder by default)")
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    args = ap.parse_args(argv)

    if not (args.shared / "summary.json").is_file():
        raise SystemExit(f"--shared {args.shared}: not a finished run directory (no summary.json)")
    rows = check_rows(args.rows.split(","))
    if any(_BY_NAME[r].kind != "loop" for r in rows):
        raise SystemExit(f"--rows {args.rows}: only loop rows fork the shared run")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="evostar-parallel-"))
    for sub in ("seq", "par", "logs"):
        shutil.rmtree(work / sub, ignore_errors=True)
        (work / sub).mkdir(parents=True)
    data = args.shared / "data"

    def commands(mode: str, extra: list[str]) -> list[list[str]]:
        return [
            fork_command(args.shared, work / mode / r, [*row_overrides(args.preset, _BY_NAME[r], data), *extra])
            for r in rows
        ]

    log(f"sequential: {len(rows)} rows one after another (the shared run's threads and workers)")
    seq_s = run_all(commands("seq", []), parallel=False, logs=work / "logs")
    log(f"parallel: {len(rows)} processes at once, {' '.join(SIDE_BY_SIDE)} (as `evostar ablate --jobs`)")
    par_s = run_all(commands("par", list(SIDE_BY_SIDE)), parallel=True, logs=work / "logs")

    per_row = {r: {"sequential": final(work / "seq" / r), "parallel": final(work / "par" / r)} for r in rows}
    print_table(
        ["way", "rows", "seconds", "ratio"],
        [["sequential", len(rows), seq_s, 1.0], ["parallel", len(rows), par_s, ratio(seq_s, par_s)]],
    )
    for r, acc in per_row.items():
        log(
            f"{r}: test-ID/OOD sequential {acc['sequential']['test_id']:.1f}/{acc['sequential']['test_ood']:.1f}, "
            f"parallel {acc['parallel']['test_id']:.1f}/{acc['parallel']['test_ood']:.1f}"
        )
    result = {
        "machine": machine_info(),
        "shared": str(args.shared),
        "rows": rows,
        "sequential_seconds": seq_s,
        "parallel_seconds": par_s,
        "speedup_parallel": ratio(seq_s, par_s),
        "accuracy": per_row,
    }
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
