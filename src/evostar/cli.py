"""Command line: `evostar demo | evolve | eval | score | report | config`.

Every command goes through one error path (`guarded`): a problem with the user's input (config,
data, model folder, run directory, a file that cannot be written) prints one line that names the
key or file and exits with status 2; anything else is a bug in evostar and says so, exiting with
status 1. `--debug` (or `EVOSTAR_DEBUG=1`) shows the traceback instead.
"""

from __future__ import annotations

import functools
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
        str, typer.Option(help="quick (a few minutes) or default (about ten) on 2 CPU cores.")
    ] = "default",
    out: Annotated[Path, typer.Option(help="Run directory.")] = Path("runs/demo"),
    seed: Annotated[int, typer.Option(help="Seed of the gym, the model and every sample.")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue a killed run in OUT.")] = False,
    progress: Annotated[bool, typer.Option(help="Progress bars.")] = True,
    overrides: Annotated[list[str] | None, typer.Argument(help="Config overrides key=value.")] = None,
) -> None:
    """Build the gym and a tiny Qwen2-VL, warm it up, self-evolve it, and report the gain."""
    from evostar.demo import run_demo

    summary = run_demo(
        preset, out, seed=seed, resume=resume, progress=progress, overrides=overrides or [], console=console
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
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory (it has summary.json).")],
    out: Annotated[Path | None, typer.Option(help="Folder for the page and plots (default: RUN_DIR/report).")] = None,
) -> None:
    """Plot accuracy over training and write a markdown page that shows it."""
    from evostar.report import write_report

    console.print(f"wrote {write_report(run_dir, out)}")


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
    app()


if __name__ == "__main__":
    main()
