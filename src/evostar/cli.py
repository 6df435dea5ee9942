"""Command line: `evostar demo | evolve | fork | eval | score | report | config | prm`.

Every command goes through one error path (`guarded`): a problem with the user's input (config,
data, model folder, run directory, a file that cannot be written) prints one line that names the
key or file and exits with status 2; anything else is a bug in evostar and says so, exiting with
status 1. `--debug` (or `EVOSTAR_DEBUG=1`) shows the traceback instead.
"""

from __future__ import annotations

import functools
import math
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Self-evolving training (M-STaR).")
console = Console(stderr=True, soft_wrap=True)  # messages stay one line: easy to grep


def debugging() -> bool:
    return os.environ.get("EVOSTAR_DEBUG", "").lower() in ("1", "true", "yes")


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show the traceback of any error.")] = False) -> None:
    if debug:
        os.environ["EVOSTAR_DEBUG"] = "1"


def fail(message: str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {escape(message)}")
    raise typer.Exit(code)


_INTERRUPTED = False


def _note_interrupt(signum: int, frame: Any) -> None:
    global _INTERRUPTED
    _INTERRUPTED = True
    signal.default_int_handler(signum, frame)


def guarded(command: Callable[..., Any]) -> Callable[..., Any]:
    """Run a command with the one error path of the command line (see the module docstring)."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        from evostar.errors import UserError

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, _note_interrupt)

        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except BrokenPipeError:  # `evostar config --fields | head`: the reader has gone
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(0) from None
        except KeyboardInterrupt:
            fail("interrupted (a run continues where it stopped with --resume)", 130)
        except Exception as err:
            if debugging():
                raise
            if _INTERRUPTED:  # Ctrl-C inside a library call (torch.save) that turned it into another error
                fail("interrupted (a run continues where it stopped with --resume)", 130)
            if isinstance(err, UserError):
                fail(str(err))
            if isinstance(err, OSError) and err.filename is not None:
                fail(f"{err.filename}: {err.strerror or err}")
            if type(err).__name__ == "OutOfMemoryError":
                fail(
                    f"out of accelerator memory ({err}); lower the batch sizes (gen.batch_size, *.optim.micro_batch_size)"
                )
            fail(
                f"internal error, a bug in evostar: {type(err).__name__}: {err} "
                "(run with --debug or EVOSTAR_DEBUG=1 for the traceback, and please report it)",
                1,
            )

    return run


@app.command()
@guarded
def demo(
    preset: Annotated[
        str, typer.Option(help="quick (a few minutes) or default (five to ten) on 2 CPU cores.")
    ] = "default",
    out: Annotated[Path, typer.Option(help="Run directory.")] = Path("runs/demo"),
    seed: Annotated[int, typer.Option(help="Seed of the gym, the model and every sample.")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue a killed run in OUT.")] = False,
    progress: Annotated[bool, typer.Option(help="Progress bars.")] = True,
    mix: Annotated[
        str | None,
        typer.Option(help="Gym families and weights, e.g. arith=0.7,compare=0.15,bars=0.15 (default: the preset's)."),
    ] = None,
    overrides: Annotated[list[str] | None, typer.Argument(help="Config overrides key=value.")] = None,
) -> None:
    """Build the gym and a tiny Qwen2-VL, warm it up, self-evolve it, and report the gain."""
    from evostar.demo import parse_mix, run_demo

    summary = run_demo(
        preset,
        out,
        seed=seed,
        resume=resume,
        progress=progress,
        overrides=overrides or [],
        console=console,
        mix=parse_mix(mix) if mix else None,
    )
    print_summary(summary)


@app.command()
@guarded
def evolve(
    config: Annotated[Path | None, typer.Option(help="YAML config file.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in output_dir.")] = False,
    overrides: Annotated[list[str] | None, typer.Argument(help="Config overrides key=value.")] = None,
) -> None:
    """Run the self-evolving loop on any model directory and data in the on-disk format."""
    from evostar.config import load_config
    from evostar.pipeline import run_experiment

    cfg = load_config(config, overrides or [])
    if not cfg.model.path:
        fail("model.path is empty: pass model.path=DIR or set it in the config")
    print_summary(run_experiment(cfg, resume=resume, console=console))


@app.command()
@guarded
def fork(
    src: Annotated[Path, typer.Argument(help="Run directory whose warm-up (and PRM) the fork reuses.")],
    dst: Annotated[Path, typer.Argument(help="New run directory.")],
    overrides: Annotated[
        list[str] | None, typer.Argument(help="Loop settings to change, key=value (evolve.*, adapt.*, eval.*, ...).")
    ] = None,
) -> None:
    """Run SRC's loop again in DST with other loop settings, reusing SRC's warm-up and PRM."""
    from evostar.fork import fork_run
    from evostar.pipeline import run_experiment
    from evostar.report import write_report

    cfg = fork_run(src, dst, overrides or [])
    summary = run_experiment(cfg, resume=True, extra={"forked_from": str(src)}, console=console)
    print_summary(summary)
    console.print(f"report: {write_report(dst)}")


@app.command()
@guarded
def ablate(
    preset: Annotated[
        str, typer.Option(help="quick (minutes) or default (hours on 2 CPU cores; docs/ablate.md); smoke is for tests.")
    ] = "quick",
    seeds: Annotated[int, typer.Option(min=1, help="Seeds 0..N-1; each has its own gym, warm-up and PRM.")] = 1,
    out: Annotated[Path, typer.Option(help="Ablation directory (a run directory per seed and row).")] = Path(
        "runs/ablate"
    ),
    rows: Annotated[str | None, typer.Option(help="Comma-separated rows to run (default: all).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue a killed ablation; finished rows are skipped.")] = (
        False
    ),
    progress: Annotated[bool, typer.Option(help="Progress bars inside each row.")] = False,
    jobs: Annotated[
        int,
        typer.Option(
            min=1,
            help="Loop rows run side by side, one thread each (the full recipe and the SFT and GRPO rows run alone); "
            "1: one after another with every core.",
        ),
    ] = 2,
) -> None:
    """The paper's Tables 1-3 and final recipe on the gym, over seeds, with each finding judged."""
    from evostar.ablate import run_ablation, table_markdown

    table = run_ablation(
        preset,
        out,
        seeds=seeds,
        rows=[r.strip() for r in rows.split(",") if r.strip()] if rows else None,
        resume=resume,
        progress=progress,
        say=console.print,
        jobs=jobs,
    )
    print(table_markdown(table))
    console.print(f"wrote {out / 'table.json'}, {out / 'table.md'}, {out / 'table.png'}")


@app.command("eval")
@guarded
def eval_cmd(
    model: Annotated[Path, typer.Option(help="Model directory.")],
    data: Annotated[list[Path], typer.Option(help="Data file(s) in the on-disk format.")],
    image_root: Annotated[str, typer.Option(help="Folder image paths resolve against.")] = "",
    batch_size: Annotated[int, typer.Option(min=1, help="Sequences per generate call.")] = 256,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Longest response.")] = 64,
    prompt_template: Annotated[str, typer.Option(help="User-turn text around {question}.")] = "{question}",
    trust_remote_code: Annotated[bool, typer.Option(help="Allow custom model code.")] = False,
    responses: Annotated[Path | None, typer.Option(help="Write the responses here (JSONL).")] = None,
) -> None:
    """Greedy accuracy of MODEL on each DATA file; prints JSON."""
    import torch

    from evostar.config import GenerationConfig, ModelConfig
    from evostar.data.loaders import load_samples
    from evostar.data.parse import DataError
    from evostar.evaluate import evaluate
    from evostar.models.hub import context_length, load_model, load_processor
    from evostar.models.inputs import VLMInputs
    from evostar.pipeline import check_prompts_fit
    from evostar.rundir import check_writable, dumps, write_jsonl

    ModelConfig(prompt_template=prompt_template)  # the template check of `evostar evolve`
    if responses is not None:
        check_writable(responses)  # before the compute that fills it
    processor = load_processor(model, trust_remote_code=trust_remote_code)
    samples = {path: load_samples(path, image_root=image_root or None) for path in data}
    io = VLMInputs(processor, prompt_template)
    for path, rows in samples.items():
        if not rows:
            raise DataError(f"{path}: no records to evaluate")
        check_prompts_fit(io, context_length(model, trust_remote_code), rows, str(path), max_new_tokens)
    net = load_model(model, trust_remote_code=trust_remote_code, device="cuda" if torch.cuda.is_available() else "cpu")
    gen = GenerationConfig(max_new_tokens=max_new_tokens, eval_batch_size=batch_size)
    result, rows = {}, []
    for path, items in samples.items():
        metrics, rs = evaluate(net, io, items, gen, desc=path.name)
        result[str(path)] = metrics
        rows += [r.to_dict() for r in rs]
    if responses:
        write_jsonl(responses, rows)
    print(dumps(result, indent=2))


@app.command("config")
@guarded
def config_cmd(
    config: Annotated[Path | None, typer.Option(help="YAML file to resolve.")] = None,
    overrides: Annotated[list[str] | None, typer.Argument(help="Overrides key=value.")] = None,
    fields: Annotated[
        bool, typer.Option("--fields", help="List every key with its default, allowed values and help.")
    ] = False,
) -> None:
    """Print the resolved config as YAML (or every key with its help)."""
    from evostar.config import describe, dump_yaml, load_config

    if fields:
        for row in describe():
            allowed = f" [{row.allowed}]" if row.allowed else ""
            print(f"{row.key:34s} {row.default!r:22s} {row.help}{allowed}")
        return
    print(dump_yaml(load_config(config, overrides or [])), end="")


@app.command("score")
@guarded
def score_cmd(
    data: Annotated[Path, typer.Option(help="Benchmark problems (MathVista: testmini.json, an object keyed by pid).")],
    responses: Annotated[
        Path, typer.Option(help='JSONL: {"pid", "response"} lines, or what `evostar eval --responses` writes.')
    ],
    benchmark: Annotated[str, typer.Option(help="Benchmark whose scoring rules apply: mathvista.")] = "mathvista",
    out_items: Annotated[Path | None, typer.Option(help="Write one JSON line per problem here.")] = None,
) -> None:
    """Score saved responses against a benchmark's answers; prints a JSON summary.

    Accuracy is over every problem in DATA (a problem without a response counts as wrong), with
    MathVista's breakdowns (by_task, by_task_short, by_skill, ...). Responses written by
    `evostar eval --responses` (records with `sample_id` and `text`) are read with `sample_id` as
    the pid: `evostar eval --data testmini.json` gives each sample its pid as id.
    """
    from evostar.reward.mathvista import load_mathvista_problems, read_responses, score_mathvista
    from evostar.rundir import check_writable, dumps, write_jsonl

    benchmarks = ("mathvista",)
    if benchmark.lower() not in benchmarks:
        fail(f"--benchmark {benchmark!r}: unknown benchmark; choose one of {', '.join(benchmarks)}")
    if out_items is not None:
        check_writable(out_items)
    problems = load_mathvista_problems(data)
    answers = read_responses(responses)
    result = score_mathvista(problems, answers)
    if out_items:
        write_jsonl(out_items, [{**item, "response": answers.get(item["pid"])} for item in result["items"]])
    if result["missing"]:
        console.print(
            f"[yellow]warning:[/] {result['missing']} of {result['n']} problems have no response (scored wrong)"
        )
    if result["extra"]:
        console.print(f"[yellow]warning:[/] {result['extra']} responses name no problem in {data} (ignored)")
    summary = {"benchmark": benchmark.lower(), "data": str(data), "responses": str(responses)}
    summary.update({k: v for k, v in result.items() if k not in ("items", "missing_pids")})
    print(dumps(summary, indent=2))


@app.command("report")
@guarded
def report_cmd(
    run_dir: Annotated[
        Path, typer.Argument(help="A finished run directory (it has summary.json) or ablation (table.json).")
    ],
    out: Annotated[Path | None, typer.Option(help="Folder for the page and plots (default: RUN_DIR/report).")] = None,
) -> None:
    """Plot accuracy over training and write a markdown page that shows it (for an ablation
    directory: its table as a plot and a page)."""
    if (run_dir / "table.json").exists():
        from evostar.ablate import write_ablation_report

        console.print(f"wrote {write_ablation_report(run_dir, out)}")
        return
    from evostar.report import write_report

    console.print(f"wrote {write_report(run_dir, out)}")


# ----------------------------------------------------------------------------- evostar prm
prm_app = typer.Typer(
    no_args_is_help=True, help="The process reward model on any model and data: collect -> label -> train -> eval."
)
app.add_typer(prm_app, name="prm")

_Policy = Annotated[Path, typer.Option(help="Policy model directory (samples the responses and completions).")]
_Data = Annotated[Path, typer.Option(help="Labelled prompts in the on-disk format (MathV360K, JSONL, ...).")]
_ImageRoot = Annotated[str, typer.Option(help="Folder image paths resolve against.")]
_Template = Annotated[str, typer.Option(help="User-turn text around {question}.")]
_Trust = Annotated[bool, typer.Option(help="Allow custom model code.")]
_MaxPrompts = Annotated[int, typer.Option(min=0, help="Use the first N prompts of DATA (0: all).")]
_NewTokens = Annotated[int, typer.Option(min=1, help="Longest response or completion, in tokens.")]
_Batch = Annotated[int, typer.Option(min=1, help="Sequences per generate call.")]
_Seed = Annotated[int, typer.Option(min=0, help="Seed of every sample.")]


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _check_temperature(value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        fail(f"--temperature {value}: must be a number > 0 (sampling)")


def _prm_inputs(
    policy: Path,
    data: Path,
    *,
    image_root: str,
    prompt_template: str,
    trust_remote_code: bool,
    max_new_tokens: int,
    max_prompts: int = 0,
) -> tuple[list, Any]:
    """DATA's labelled prompts and the policy's prompt encoder, refused (file, record, field)
    before any model weights load when a record lacks a gold answer or a prompt does not fit."""
    from evostar.config import ModelConfig
    from evostar.data.loaders import load_samples
    from evostar.data.parse import DataError
    from evostar.models.hub import context_length, load_processor
    from evostar.models.inputs import VLMInputs
    from evostar.pipeline import check_prompts_fit

    ModelConfig(prompt_template=prompt_template)  # the template check of `evostar evolve`
    processor = load_processor(policy, trust_remote_code=trust_remote_code)
    samples = load_samples(data, image_root=image_root or None)[: max_prompts or None]
    if not samples:  # load_samples has refused records without a gold answer
        raise DataError(f"{data}: no records")
    io = VLMInputs(processor, prompt_template)
    check_prompts_fit(io, context_length(policy, trust_remote_code), samples, str(data), max_new_tokens)
    return samples, io


@prm_app.command("collect")
@guarded
def prm_collect(
    policy: _Policy,
    data: _Data,
    out: Annotated[Path, typer.Option(help="Write the responses here (JSONL, with rewards).")],
    k: Annotated[int, typer.Option(min=1, help="Responses sampled per prompt.")] = 4,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (> 0).")] = 1.0,
    max_prompts: _MaxPrompts = 0,
    max_new_tokens: _NewTokens = 64,
    batch_size: _Batch = 512,
    seed: _Seed = 0,
    image_root: _ImageRoot = "",
    prompt_template: _Template = "{question}",
    trust_remote_code: _Trust = False,
) -> None:
    """Sample K responses per prompt of DATA with POLICY: the PRM's training responses."""
    from evostar.dynamics import accuracy
    from evostar.models.hub import load_model
    from evostar.prm_stages import sample_responses
    from evostar.rundir import check_writable, dumps, write_jsonl

    _check_temperature(temperature)
    check_writable(out)
    samples, io = _prm_inputs(
        policy,
        data,
        image_root=image_root,
        prompt_template=prompt_template,
        trust_remote_code=trust_remote_code,
        max_new_tokens=max_new_tokens,
        max_prompts=max_prompts,
    )
    net = load_model(policy, trust_remote_code=trust_remote_code, device=_device())
    responses = sample_responses(
        net, io, samples, k=k, temperature=temperature, max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed
    )
    write_jsonl(out, [r.to_dict() for r in responses])
    print(
        dumps({"prompts": len(samples), "responses": len(responses), "accuracy": accuracy(responses), "out": str(out)})
    )


@prm_app.command("label")
@guarded
def prm_label(
    policy: _Policy,
    data: _Data,
    responses: Annotated[Path, typer.Option(help="Responses to label (JSONL, as `evostar prm collect` writes).")],
    out: Annotated[Path, typer.Option(help="Labels directory (chunks + manifest; a killed run resumes there).")],
    n_completions: Annotated[int, typer.Option(help="Monte-Carlo completions per step prefix.")] = 8,
    strategy: Annotated[str, typer.Option(help="binary (search for the first error) or every (each prefix).")] = (
        "binary"
    ),
    chunk_size: Annotated[int, typer.Option(help="Responses per chunk, the unit of resume.")] = 64,
    temperature: Annotated[float, typer.Option(help="Sampling temperature of the completions.")] = 1.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling of the completions.")] = 1.0,
    max_new_tokens: _NewTokens = 64,
    batch_size: _Batch = 512,
    seed: _Seed = 0,
    image_root: _ImageRoot = "",
    prompt_template: _Template = "{question}",
    trust_remote_code: _Trust = False,
) -> None:
    """Monte-Carlo step labels of RESPONSES: from each step prefix, does POLICY still reach the gold answer?"""
    import time

    from evostar.config import PRMConfig
    from evostar.errors import UserError
    from evostar.models.hub import load_model
    from evostar.prm_stages import labels_against_truth, read_responses
    from evostar.reward.prm import hf_completer, label_responses
    from evostar.reward.prm.labels import read_manifest
    from evostar.rundir import dumps

    cfg = PRMConfig(  # the ranges and choices of the run's prm section
        n_completions=n_completions,
        strategy=strategy,
        chunk_size=chunk_size,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        completion_batch_size=batch_size,
    )
    rows = read_responses(responses)
    samples, io = _prm_inputs(
        policy,
        data,
        image_root=image_root,
        prompt_template=prompt_template,
        trust_remote_code=trust_remote_code,
        max_new_tokens=max_new_tokens,
    )
    ids = {s.id for s in samples}
    stray = next((k for k, r in enumerate(rows, 1) if r.sample_id not in ids), None)
    if stray is not None:
        raise UserError(f"{responses} line {stray}: sample_id {rows[stray - 1].sample_id!r} is not a record of {data}")
    net = load_model(policy, trust_remote_code=trust_remote_code, device=_device())
    t0 = time.perf_counter()
    complete = hf_completer(
        net, io, temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    settings = {"policy": str(policy), "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens}
    labels = label_responses(
        samples,
        rows,
        complete,
        out,
        n=n_completions,
        strategy=strategy,
        chunk_size=chunk_size,
        seed=seed,
        settings=settings,
    )
    seconds = time.perf_counter() - t0
    spent = (read_manifest(out) or {}).get("spent") or {}
    step_labels = sum(len(lab.hard) for lab in labels)
    summary = {
        "responses": len(labels),
        "step_labels": step_labels,
        "first_error_share": sum(lab.first_error is not None for lab in labels) / len(labels) if labels else None,
        "completions": sum(int(v) for v in spent.values()),
        "against_truth": labels_against_truth(labels, samples),
        "seconds": seconds,
        "out": str(out),
    }
    print(dumps(summary))


@prm_app.command("train")
@guarded
def prm_train(
    init: Annotated[Path, typer.Option(help="Checkpoint the PRM starts from (usually the policy).")],
    data: _Data,
    labels: Annotated[Path, typer.Option(help="Labels directory written by `evostar prm label`.")],
    out: Annotated[Path, typer.Option(help="Write the PRM checkpoint here (a new or a PRM directory).")],
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 200,
    label: Annotated[str, typer.Option(help="hard or soft step targets.")] = "hard",
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW, cosine).")] = 2e-4,
    batch_size: Annotated[int, typer.Option(help="Responses per optimizer step.")] = 16,
    negative_weight: Annotated[float, typer.Option(help="Loss weight of negative labels (0: balance).")] = 1.0,
    freeze_vision: Annotated[bool, typer.Option(help="Keep the vision encoder fixed.")] = False,
    tag: Annotated[str, typer.Option(help="Step tag text ('': the first single-token candidate).")] = "",
    seed: _Seed = 0,
    image_root: _ImageRoot = "",
    prompt_template: _Template = "{question}",
    trust_remote_code: _Trust = False,
) -> None:
    """Train a PRM from INIT on the step labels in LABELS; saves an HF checkpoint with prm_config.json."""
    from evostar.config import OptimConfig, PRMConfig
    from evostar.errors import UserError
    from evostar.prm_stages import train_prm
    from evostar.reward.prm import read_labels
    from evostar.reward.prm.model import PRM_CONFIG
    from evostar.rundir import dumps

    cfg = PRMConfig(
        steps=steps,
        label=label,
        negative_weight=negative_weight,
        freeze_vision=freeze_vision,
        tag=tag,
        optim=OptimConfig(lr=lr, batch_size=batch_size, schedule="cosine"),
    )
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / PRM_CONFIG).is_file())):
        raise UserError(f"{out}: exists and is not a PRM checkpoint, which --out would replace; choose a new directory")
    samples, _ = _prm_inputs(
        init,
        data,
        image_root=image_root,
        prompt_template=prompt_template,
        trust_remote_code=trust_remote_code,
        max_new_tokens=1,
    )
    prm, info = train_prm(
        init,
        read_labels(labels),
        samples,
        cfg,
        prompt_template=prompt_template,
        device=_device(),
        trust_remote_code=trust_remote_code,
        seed=seed,
    )
    prm.save(out)
    print(dumps({**info, "out": str(out), "tokens": prm.config()["tokens"]}))


@prm_app.command("eval")
@guarded
def prm_eval(
    prm: Annotated[Path, typer.Option(help="PRM checkpoint directory (written by `evostar prm train`).")],
    policy: _Policy,
    data: _Data,
    k: Annotated[int, typer.Option(min=1, help="Responses sampled per prompt (N goes up to K).")] = 16,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (> 0).")] = 1.0,
    aggregate: Annotated[str, typer.Option(help="Response score from step scores: min, mean, last or product.")] = (
        "min"
    ),
    autocast: Annotated[str, typer.Option(help="Score under bf16 autocast: '' (off) or bf16.")] = "",
    max_prompts: _MaxPrompts = 0,
    max_new_tokens: _NewTokens = 64,
    batch_size: _Batch = 512,
    seed: _Seed = 0,
    out: Annotated[Path | None, typer.Option(help="Also write the JSON report here.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Plot accuracy against N here (PNG).")] = None,
    responses: Annotated[Path | None, typer.Option(help="Write the scored responses here (JSONL).")] = None,
    image_root: _ImageRoot = "",
    prompt_template: _Template = "{question}",
    trust_remote_code: _Trust = False,
) -> None:
    """Judge a PRM on POLICY's K samples per prompt of DATA; prints JSON.

    As a step judge where step truth exists (the gym: step AUROC, first-error F1), as a verifier
    (best-of-N by PRM, majority and PRM-weighted voting beside greedy, N = 1, 2, 4, 8, 16) and as
    a reranker of correct responses (PRM top-2 against the rest)."""
    from evostar.config import GenerationConfig, PRMConfig
    from evostar.evaluate import evaluate
    from evostar.models.hub import load_model
    from evostar.prm_stages import eval_report, judge_baselines, plot_selection, sample_responses, score_with
    from evostar.reward.prm import load_prm
    from evostar.rundir import atomic_write_json, check_writable, dumps, write_jsonl

    _check_temperature(temperature)
    cfg = PRMConfig(aggregate=aggregate, score_autocast=autocast)
    for path in (out, plot, responses):
        if path is not None:
            check_writable(path)  # before the compute that fills it
    samples, io = _prm_inputs(
        policy,
        data,
        image_root=image_root,
        prompt_template=prompt_template,
        trust_remote_code=trust_remote_code,
        max_new_tokens=max_new_tokens,
        max_prompts=max_prompts,
    )
    device = _device()
    scorer = load_prm(prm, device=device, trust_remote_code=trust_remote_code)
    net = load_model(policy, trust_remote_code=trust_remote_code, device=device)
    sampled = sample_responses(
        net, io, samples, k=k, temperature=temperature, max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed
    )
    score_with(scorer, cfg, samples, sampled)
    gen = GenerationConfig(max_new_tokens=max_new_tokens, eval_batch_size=batch_size)
    _, greedy = evaluate(net, io, samples, gen, desc="greedy", progress=False)
    baselines = judge_baselines(net, io, samples, sampled)
    report = {
        "prm": str(prm),
        "policy": str(policy),
        "data": str(data),
        "k": k,
        **eval_report(sampled, greedy, baselines=baselines),
    }
    if responses is not None:
        write_jsonl(responses, [r.to_dict() for r in sampled])
    if plot is not None:
        report["plot"] = str(plot_selection(report, plot))
    if out is not None:
        atomic_write_json(out, report)
    print(dumps(report, indent=2))


def print_summary(summary: dict) -> None:
    """The accuracy table per stage and the iterations' table, on stdout."""
    acc = summary["accuracy"]
    table = Table(title=f"evostar {summary.get('preset', summary.get('mode', ''))} — accuracy (%)")
    table.add_column("split")
    stages = [s for s in ("base", "warmup", "final") if s in acc]
    for s in stages:
        table.add_column(s, justify="right")
    if "warmup" in acc:
        table.add_column("final − warm-up", justify="right")
    for split in acc["final"]:
        row = [split] + [f"{100 * acc[s][split]:.1f}" for s in stages]
        if "warmup" in acc:
            row.append(f"{100 * (acc['final'][split] - acc['warmup'][split]):+.1f}")
        table.add_row(*row)
    out = Console()
    out.print(table)
    it = Table(title="iterations")
    for col in ("it", "prompts", "responses", "kept", "val acc", "val pass@K", "T", "s"):
        it.add_column(col, justify="right")
    for r in summary["iterations"]:
        pass_k = "-" if r["val_pass_at_k"] is None else f"{100 * r['val_pass_at_k']:.1f}"
        it.add_row(
            *(str(r[k]) for k in ("iteration", "prompts", "responses", "kept")),
            f"{100 * r['val_accuracy']:.1f}",
            pass_k,
            f"{r['temperature']:.2f}",
            f"{r['seconds']:.0f}",
        )
    out.print(it)
    out.print(f"wall {summary['wall_seconds']:.0f} s — {summary['run_dir']}/summary.json")


def main() -> None:
    """The `evostar` entry point (also `python -m evostar.cli`)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenizers' threads and forked workers
    from evostar.launch import keep_freed_memory

    keep_freed_memory()  # the same activation buffers are freed and allocated at every step
    app()


if __name__ == "__main__":
    main()
