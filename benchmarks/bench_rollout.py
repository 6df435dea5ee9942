"""Rollout throughput: evostar's generation stage vs a plain `transformers` generate loop.

All backends sample the same prompts with the same K, temperature (top-p 1, top-k off),
max_new_tokens, batch size (in sequences), weights, threads and seeds, and decode the new tokens
to text. What differs is how the batch is built, how tokens are drawn and where:

* evostar (`evostar.rollout.hf.generate`, in this process): prompts sorted by length, each
  prompt+image encoded once (fresh encoding cache every timed run), repeated K times in the
  batch, tokens drawn by inverse-CDF sampling (`InverseCDFSampler`) instead of `torch.multinomial`.
* evostar-pool (`evostar.rollout.pool.RolloutPool`, what the demo uses): the same, in two
  single-thread processes over a shared bf16 copy of the weights (pushed before every call, as
  in the loop; the processes start in the untimed warm-up run).
* transformers: what a user writes: chat template per prompt, `processor(text=..., images=...)`
  on the batch with every prompt repeated K times (left padding), `model.generate(...,
  num_return_sequences=1)` with its own multinomial sampling, transformers' sdpa attention and
  its default `DynamicCache`.

The tiny model is first warmed for a few SFT steps on the seed chains of thought so that it emits
end-of-turn; a random-init model would run every sequence to `max_new_tokens`.

    python benchmarks/bench_rollout.py --out rollout.json
    python benchmarks/bench_rollout.py --quick          # seconds; smoke test only
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from _common import (
    default_workdir,
    load_split,
    log,
    machine_info,
    median,
    prepare_gym,
    prepare_tiny_model,
    print_table,
    ratio,
    setup_torch,
    stock_attention,
    write_json,
)

from evostar.config import OptimConfig
from evostar.models.hub import load_model_and_processor, save_model_and_processor
from evostar.models.inputs import VLMInputs
from evostar.rollout.hf import generate
from evostar.rollout.pool import RolloutPool
from evostar.train import Example, SFTTrainer

FULL = dict(prompts=256, k=8, max_new_tokens=48, batch_size=512, repeats=3, warm_steps=60, warm_batch=32, n_seed=200)
QUICK = dict(prompts=8, k=2, max_new_tokens=12, batch_size=8, repeats=1, warm_steps=8, warm_batch=8, n_seed=32)


def warm_model(
    model_init: Path, gym_dir: Path, *, steps: int, n_seed: int, seed: int, batch_size: int = 32
) -> tuple[Path, dict[str, float]]:
    """SFT the random-init model on the seed chains of thought so it learns to end its turn."""
    out = model_init.parent / f"{model_init.name}-warm{steps}x{batch_size}"
    info_path = out / "bench_warm.json"
    if info_path.exists():
        return out, json.loads(info_path.read_text())
    model, processor = load_model_and_processor(model_init)
    io = VLMInputs(processor)
    seeds = load_split(gym_dir, "seed", n_seed)
    examples = [Example(s, s.target) for s in seeds]
    cfg = OptimConfig(lr=1e-3, schedule="constant", batch_size=min(batch_size, len(examples)))
    t0 = time.perf_counter()
    stats = SFTTrainer(model, io, cfg).train(examples, steps, seed=seed, progress=False)
    info = {
        "steps": steps,
        "examples": len(examples),
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "final_loss": stats["loss"],
        "seconds": time.perf_counter() - t0,
    }
    save_model_and_processor(model, processor, out)
    info_path.write_text(json.dumps(info))
    log(f"warmed {out} ({info['seconds']:.1f} s)")
    return out, info


def evostar_rollout(model: torch.nn.Module, processor: Any, samples: Sequence[Any], **kw: Any) -> list[str]:
    """evostar's generation stage, as the self-evolving loop calls it."""
    io = VLMInputs(processor)  # cold encoding cache: every timed run encodes its prompts once
    responses = generate(
        model,
        io,
        samples,
        k=kw["k"],
        temperature=kw["temperature"],
        top_p=1.0,
        max_new_tokens=kw["max_new_tokens"],
        batch_size=kw["batch_size"],
        progress=False,
    )
    return [r.text for r in responses]


_POOLS: dict[str, RolloutPool] = {}


def pool_rollout(
    model: torch.nn.Module, processor: Any, samples: Sequence[Any], dtype: str = "bfloat16", **kw: Any
) -> list[str]:
    """The demo's sampling: two single-thread processes over shared bf16 weights."""
    pool = _POOLS.setdefault(dtype, RolloutPool(kw["model_dir"], workers=2, dtype=dtype))
    io = VLMInputs(processor)
    responses = pool(
        model,
        io,
        samples,
        k=kw["k"],
        temperature=kw["temperature"],
        top_p=1.0,
        max_new_tokens=kw["max_new_tokens"],
        batch_size=kw["batch_size"],
        progress=False,
    )
    return [r.text for r in responses]


def user_messages(question: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


@torch.inference_mode()
def transformers_rollout(model: torch.nn.Module, processor: Any, samples: Sequence[Any], **kw: Any) -> list[str]:
    """The loop a user writes: chat template, processor on the K-times-repeated batch, generate."""
    from PIL import Image

    model.eval()
    k, per_batch = kw["k"], max(1, kw["batch_size"] // kw["k"])
    texts_out: list[str] = []
    for start in range(0, len(samples), per_batch):
        texts, images = [], []
        for s in samples[start : start + per_batch]:
            prompt = processor.apply_chat_template(
                user_messages(s.question), add_generation_prompt=True, tokenize=False
            )
            with Image.open(s.image) as im:
                img = im.convert("RGB")
            texts += [prompt] * k
            images += [img] * k
        enc = processor(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt")
        with stock_attention(model):
            out = model.generate(
                **enc,
                do_sample=True,
                temperature=kw["temperature"],
                top_p=1.0,
                top_k=0,
                max_new_tokens=kw["max_new_tokens"],
                num_return_sequences=1,
            )
        texts_out += processor.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return texts_out


BACKENDS: dict[str, Callable[..., Any]] = {
    "evostar": evostar_rollout,
    "evostar-pool": pool_rollout,
    # the same pool over float32 weights: faster than bf16 on CPUs without bf16 matrix units
    "evostar-pool-fp32": lambda *a, **kw: pool_rollout(*a, dtype="float32", **kw),
    "transformers": transformers_rollout,
}


def timed(
    name: str, model: torch.nn.Module, processor: Any, samples: Sequence[Any], seed: int, **kw: Any
) -> tuple[dict[str, float], list[str]]:
    """Run one backend under a seed; (metrics, texts).

    Generated tokens are counted the same way for every backend, by re-tokenizing the decoded
    texts (plus the end-of-turn token of those that stopped before `max_new_tokens`).
    """
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    texts = [t.strip() for t in BACKENDS[name](model, processor, samples, **kw)]
    seconds = time.perf_counter() - t0
    lengths = [len(ids) for ids in processor.tokenizer(texts, add_special_tokens=False)["input_ids"]]
    hit_max = sum(n >= kw["max_new_tokens"] for n in lengths)
    metrics = {
        "seconds": seconds,
        "sequences": len(texts),
        "tokens": sum(lengths) + len(texts) - hit_max,
        "hit_max": hit_max,
        "answer_marker": sum("# Answer" in t for t in texts),
    }
    return metrics, texts


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, help=f"prompts (default {FULL['prompts']})")
    p.add_argument("--k", type=int, help=f"samples per prompt (default {FULL['k']})")
    p.add_argument("--max-new-tokens", type=int, help=f"(default {FULL['max_new_tokens']})")
    p.add_argument("--batch-size", type=int, help=f"sequences per generate call (default {FULL['batch_size']})")
    p.add_argument("--repeats", type=int, help=f"timed repeats, median reported (default {FULL['repeats']})")
    p.add_argument("--warm-steps", type=int, help=f"SFT steps before timing (default {FULL['warm_steps']})")
    p.add_argument("--warm-batch", type=int, help=f"SFT batch size of the warming (default {FULL['warm_batch']})")
    p.add_argument("--n-seed", type=int, help=f"seed chains of thought for warming (default {FULL['n_seed']})")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None, help="cache for gym and models (default: temp dir)")
    p.add_argument("--out", type=Path, default=None, help="write the result JSON here")
    p.add_argument("--quick", action="store_true", help="tiny sizes, 1 repeat: a smoke test, not a measurement")
    args = p.parse_args(argv)
    if args.temperature <= 0:
        p.error("--temperature must be > 0: the benchmark compares sampling K responses per prompt")
    base = QUICK if args.quick else FULL
    cfg = {key: getattr(args, key) if getattr(args, key) is not None else val for key, val in base.items()}
    cfg.update(temperature=args.temperature, threads=args.threads, seed=args.seed, quick=args.quick)
    setup_torch(args.threads)

    workdir = args.workdir or default_workdir()
    gym = prepare_gym(workdir, n_seed=cfg["n_seed"], n_train=cfg["prompts"], seed=args.seed)
    model_dir, warm = warm_model(
        prepare_tiny_model(workdir, gym, seed=args.seed),
        gym,
        steps=cfg["warm_steps"],
        n_seed=cfg["n_seed"],
        seed=args.seed,
        batch_size=cfg["warm_batch"],
    )
    model, processor = load_model_and_processor(model_dir)
    model.eval()
    samples = load_split(gym, "train", cfg["prompts"])
    io = VLMInputs(processor)
    assert io.prompt_text(samples[0]) == processor.apply_chat_template(
        user_messages(samples[0].question), add_generation_prompt=True, tokenize=False
    ), "the two backends must render the same prompt"
    kw = {key: cfg[key] for key in ("k", "temperature", "max_new_tokens", "batch_size")}
    kw["model_dir"] = str(model_dir)

    log(
        f"model warmed {warm['steps']} SFT steps (batch {warm['batch_size']}, lr {warm['lr']}) on "
        f"{warm['examples']} seed chains of thought, final loss {warm['final_loss']:.3f}"
    )
    log(
        f"{len(samples)} prompts x K={cfg['k']}, temperature {cfg['temperature']}, max_new_tokens "
        f"{cfg['max_new_tokens']}, batch {cfg['batch_size']} sequences, {torch.get_num_threads()} threads"
    )

    warm_n = max(1, cfg["batch_size"] // cfg["k"])
    for name in BACKENDS:  # warm-up run (one batch each; starts the pool's processes), untimed
        timed(name, model, processor, samples[:warm_n], args.seed, **kw)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in BACKENDS}
    for r in range(cfg["repeats"]):
        names = list(BACKENDS) if r % 2 == 0 else list(BACKENDS)[::-1]  # alternate to cancel drift
        for name in names:
            m, _ = timed(name, model, processor, samples, args.seed + r, **kw)
            runs[name].append(m)
            log(f"  repeat {r + 1} {name:12s} {m['seconds']:7.2f} s  {m['sequences'] / m['seconds']:8.1f} seq/s")
    for pool in _POOLS.values():
        pool.close()

    result: dict[str, Any] = {"benchmark": "rollout", "config": cfg, "warm_model": warm, "machine": machine_info()}
    for name, rs in runs.items():
        result[name] = {
            "seq_per_s": median([m["sequences"] / m["seconds"] for m in rs]),
            "tokens_per_s": median([m["tokens"] / m["seconds"] for m in rs]),
            "seconds": median([m["seconds"] for m in rs]),
            "sequences": rs[0]["sequences"],
            "mean_new_tokens": sum(m["tokens"] for m in rs) / sum(m["sequences"] for m in rs),
            "hit_max_frac": sum(m["hit_max"] for m in rs) / sum(m["sequences"] for m in rs),
            "answer_marker_frac": sum(m["answer_marker"] for m in rs) / sum(m["sequences"] for m in rs),
            "runs": rs,
        }
    tf = result["transformers"]
    result["ratio"] = {
        name: {
            "seq_per_s": ratio(result[name]["seq_per_s"], tf["seq_per_s"]),
            "tokens_per_s": ratio(result[name]["tokens_per_s"], tf["tokens_per_s"]),
        }
        for name in ("evostar", "evostar-pool", "evostar-pool-fp32")
    }
    log("")
    print_table(
        ["backend", "seconds", "seq/s", "gen tok/s", "mean new tok", "hit max", "# Answer"],
        [
            [
                n,
                result[n]["seconds"],
                result[n]["seq_per_s"],
                result[n]["tokens_per_s"],
                result[n]["mean_new_tokens"],
                f"{result[n]['hit_max_frac']:.0%}",
                f"{result[n]['answer_marker_frac']:.0%}",
            ]
            for n in BACKENDS
        ]
        + [
            [f"{n} / transformers", "", result["ratio"][n]["seq_per_s"], result["ratio"][n]["tokens_per_s"], "", "", ""]
            for n in ("evostar", "evostar-pool", "evostar-pool-fp32")
        ],
    )
    log(f"(median of {cfg['repeats']} repeat(s) after a warm-up run; compare ratios within one run)")
    log("'# Answer': share of samples in the trained format (the samplers draw the same distribution)")
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
