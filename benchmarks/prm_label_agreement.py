"""Do `binary` Monte-Carlo step labels agree with `every`, and for how many fewer completions?

Labels the same responses of a finished PRM run (RUN/prm/responses.jsonl, the run's warm-up
policy as the completer, the run's prm settings) twice, once per strategy, into
RUN/prm/agreement/{every,binary}, and prints JSON: the share of responses whose first-error
position is the same, the step-label agreement on the steps binary search estimated, and the
completions each strategy generated (shared prefixes counted once, as the labeller samples them).
The two strategies draw independent completions, so part of their disagreement is Monte-Carlo
noise; `first_error_agreement_same_estimates` replays binary search on every's own estimates,
which isolates what the search itself changes (it assumes that once a prefix fails, every
longer one fails too). `--repeat` labels the responses with `every` a second time, from another
seed, into RUN/prm/agreement/every_repeat: `first_error_agreement_every_vs_every` is then how
often two independent labellings by the *same* strategy agree, the ceiling that noise puts on
any agreement between two independent labellings.
The label directories resume, so a killed measurement continues where it stopped.

    python benchmarks/prm_label_agreement.py RUN [--responses 256] [--repeat]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from _common import log, setup_torch


def replay_binary(values: list[float]) -> int | None:
    """The first error binary search finds when prefix i's estimate is `values[i - 1]`."""
    from evostar.reward.prm.labels import _Search

    search = _Search(["."] * len(values), "binary")
    while pending := search.pending():
        search.record(pending[0], values[pending[0] - 1])
    return search.labels()[3]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="run directory whose prm_collect stage finished")
    parser.add_argument("--responses", type=int, default=256, help="first N collected responses (0: all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", action="store_true", help="label with every twice (independent seeds)")
    args = parser.parse_args(argv)
    setup_torch(args.threads)

    from evostar.config import load_config
    from evostar.context import prompt_encoder
    from evostar.models.hub import load_policy
    from evostar.pipeline import load_data
    from evostar.prm_stages import read_responses
    from evostar.reward.prm import hf_completer, label_responses
    from evostar.reward.prm.labels import read_manifest
    from evostar.rundir import RunDir, stage_seed

    cfg = load_config(args.run / "config.yaml", [])
    p = cfg.prm
    data = load_data(cfg)
    responses = read_responses(args.run / "prm" / "responses.jsonl")
    if args.responses:
        responses = responses[: args.responses]
    io = prompt_encoder(cfg)
    model = load_policy(cfg.model, RunDir(args.run, resume=True).checkpoint_dir("warmup"))
    complete = hf_completer(
        model,
        io,
        temperature=p.temperature,
        top_p=p.top_p,
        max_new_tokens=p.max_new_tokens,
        batch_size=p.completion_batch_size,
    )
    labels, spent, seconds = {}, {}, {}
    runs = [("every", "every", 0), ("binary", "binary", 0)] + ([("every_repeat", "every", 1)] if args.repeat else [])
    for name, strategy, reseed in runs:
        out = args.run / "prm" / "agreement" / name
        t0 = time.perf_counter()
        labels[name] = label_responses(
            data.train,
            responses,
            complete,
            out,
            n=p.n_completions,
            strategy=strategy,
            chunk_size=p.chunk_size,
            seed=stage_seed(cfg.seed, "prm-label") + reseed,
            settings={"temperature": p.temperature, "top_p": p.top_p, "max_new_tokens": p.max_new_tokens},
        )
        seconds[name] = time.perf_counter() - t0
        spent[name] = sum(int(v) for v in ((read_manifest(out) or {}).get("spent") or {}).values())
        log(f"{name}: {len(labels[name])} responses, {spent[name]} completions, {seconds[name]:.0f} s")
    pairs = list(zip(labels["every"], labels["binary"], strict=True))
    same_first = [e.first_error == b.first_error for e, b in pairs]
    # the search replayed on every's own estimates: what differs then is the algorithm, not the
    # Monte-Carlo noise of two independent sets of completions
    replayed = [replay_binary(e.soft) == e.first_error for e, _ in pairs]
    estimated = [(e.hard[k], b.hard[k]) for e, b in pairs for k in range(len(b.hard)) if b.estimated[k]]
    all_steps = [(e.hard[k], b.hard[k]) for e, b in pairs for k in range(len(b.hard))]
    # every's labels need not be monotone (a noisy estimate can come back positive after a negative)
    monotone = [all(not later or earlier for earlier, later in zip(e.hard, e.hard[1:], strict=False)) for e, _ in pairs]
    result = {
        "run": str(args.run),
        "responses": len(pairs),
        "steps": len(all_steps),
        "n_completions": p.n_completions,
        "first_error_agreement": sum(same_first) / len(pairs),
        "first_error_agreement_same_estimates": sum(replayed) / len(pairs),
        "step_label_agreement_all": sum(a == b for a, b in all_steps) / len(all_steps),
        "step_label_agreement_estimated": sum(a == b for a, b in estimated) / len(estimated) if estimated else None,
        "every_monotone_share": sum(monotone) / len(pairs),
        "first_error_share": {s: sum(lab.first_error is not None for lab in labels[s]) / len(pairs) for s in labels},
        "completions": spent,
        "completion_ratio_binary_over_every": spent["binary"] / spent["every"] if spent["every"] else None,
        "seconds": seconds,
    }
    if args.repeat:
        again = list(zip(labels["every"], labels["every_repeat"], strict=True))
        same = sum(a.first_error == b.first_error for a, b in again)
        result["first_error_agreement_every_vs_every"] = same / len(again)
        result["step_label_agreement_every_vs_every"] = sum(
            x == y for a, b in again for x, y in zip(a.hard, b.hard, strict=True)
        ) / sum(len(a.hard) for a, _ in again)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
