"""Command line: `evostar demo | evolve | eval | score | config`."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Self-evolving training (M-STaR).")
console = Console(stderr=True)


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(2)


def _user_errors():
    from evostar.config import ConfigError
    from evostar.data.loaders import DataError
    from evostar.models.hub import ModelLoadError

    return (ConfigError, DataError, ModelLoadError, FileExistsError, FileNotFoundError, ValueError)


@app.command()
def demo(
    preset: Annotated[str, typer.Option(help="quick (~2.5 min) or default (~9 min) on 2 CPU cores.")] = "default",
    out: Annotated[Path, typer.Option(help="Run directory.")] = Path("runs/demo"),
    seed: Annotated[int, typer.Option(help="Seed of the gym, the model and every sample.")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue a killed run in OUT.")] = False,
    progress: Annotated[bool, typer.Option(help="Progress bars.")] = True,
    overrides: Annotated[list[str] | None, typer.Argument(help="Config overrides key=value.")] = None,
) -> None:
    """Build the gym and a tiny Qwen2-VL, warm it up, self-evolve it, and report the gain."""
    from evostar.demo import run_demo

    try:
        summary = run_demo(preset, out, seed=seed, resume=resume, progress=progress, overrides=overrides or [])
    except _user_errors() as err:
        _fail(str(err))
    print_summary(summary)


@app.command()
def evolve(
    config: Annotated[Path | None, typer.Option(help="YAML config file.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in output_dir.")] = False,
    overrides: Annotated[list[str] | None, typer.Argument(help="Config overrides key=value.")] = None,
) -> None:
    """Run the self-evolving loop on any model directory and data in the on-disk format."""
    from evostar.config import load_config
    from evostar.pipeline import run_experiment

    try:
        cfg = load_config(config, overrides or [])
        if not cfg.model.path:
            _fail("model.path is empty: pass model.path=DIR or set it in the config")
        summary = run_experiment(cfg, resume=resume, console=console)
    except _user_errors() as err:
        _fail(str(err))
    print_summary(summary)


@app.command("eval")
def eval_cmd(
    model: Annotated[Path, typer.Option(help="Model directory.")],
    data: Annotated[list[Path], typer.Option(help="Data file(s) in the on-disk format.")],
    image_root: Annotated[str, typer.Option(help="Folder image paths resolve against.")] = "",
    batch_size: Annotated[int, typer.Option(help="Sequences per generate call.")] = 256,
    max_new_tokens: Annotated[int, typer.Option(help="Longest response.")] = 64,
    prompt_template: Annotated[str, typer.Option(help="User-turn text around {question}.")] = "{question}",
    trust_remote_code: Annotated[bool, typer.Option(help="Allow custom model code.")] = False,
    responses: Annotated[Path | None, typer.Option(help="Write the responses here (JSONL).")] = None,
) -> None:
    """Greedy accuracy of MODEL on each DATA file; prints JSON."""
    import torch

    from evostar.config import GenerationConfig
    from evostar.data.loaders import load_samples
    from evostar.evaluate import evaluate
    from evostar.models.hub import load_model, load_processor
    from evostar.models.inputs import VLMInputs
    from evostar.rundir import write_jsonl

    try:
        processor = load_processor(model, trust_remote_code=trust_remote_code)
        net = load_model(model, trust_remote_code=trust_remote_code, device="cuda" if torch.cuda.is_available() else "cpu")
        io = VLMInputs(processor, prompt_template)
        gen = GenerationConfig(max_new_tokens=max_new_tokens, eval_batch_size=batch_size)
        result, rows = {}, []
        for path in data:
            samples = load_samples(path, image_root=image_root or None)
            metrics, rs = evaluate(net, io, samples, gen, desc=path.name)
            result[str(path)] = metrics
            rows += [r.to_dict() for r in rs]
        if responses:
            write_jsonl(responses, rows)
    except _user_errors() as err:
        _fail(str(err))
    print(json.dumps(result, indent=2))


@app.command("config")
def config_cmd(
    config: Annotated[Path | None, typer.Option(help="YAML file to resolve.")] = None,
    overrides: Annotated[list[str] | None, typer.Argument(help="Overrides key=value.")] = None,
    fields: Annotated[bool, typer.Option("--fields", help="List every key with its help.")] = False,
) -> None:
    """Print the resolved config as YAML (or every key with its help)."""
    from evostar.config import describe, dump_yaml, load_config

    if fields:
        for key, default, help_ in describe():
            print(f"{key:36s} {default:24s} {help_}")
        return
    try:
        print(dump_yaml(load_config(config, overrides or [])), end="")
    except _user_errors() as err:
        _fail(str(err))


@app.command("score")
def score_cmd(
    data: Annotated[Path, typer.Option(help="Benchmark problems (MathVista: testmini.json, an object keyed by pid).")],
    responses: Annotated[
        Path,
        typer.Option(help='JSONL: {"pid", "response"} lines, or what `evostar eval --responses` writes.'),
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
    from evostar.reward.mathvista import (
        ScoreInputError,
        load_mathvista_problems,
        load_responses_jsonl,
        score_mathvista,
    )
    from evostar.rundir import write_jsonl

    benchmarks = ("mathvista",)
    if benchmark.lower() not in benchmarks:
        _fail(f"--benchmark {benchmark!r}: unknown benchmark; choose one of {', '.join(benchmarks)}")

    def read_responses(path: Path) -> dict[str, str]:
        """{"pid", "response"} lines via the MathVista reader; eval records mapped first."""
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ScoreInputError(f"{path}: cannot read responses file: {getattr(e, 'strerror', None) or e}") from e
        first = next((ln for ln in lines if ln.strip()), None)
        try:
            head = json.loads(first) if first is not None else {}
        except json.JSONDecodeError:
            head = {}  # the MathVista reader reports it with its line number
        if isinstance(head, dict) and "sample_id" in head and "pid" not in head:
            return load_responses_jsonl(path, id_field="sample_id", text_field="text")
        return load_responses_jsonl(path)

    try:
        problems = load_mathvista_problems(data)
        answers = read_responses(responses)
        result = score_mathvista(problems, answers)
        if out_items:
            write_jsonl(out_items, [{**item, "response": answers.get(item["pid"])} for item in result["items"]])
    except (ScoreInputError, OSError) as err:
        _fail(str(err))
    if result["missing"]:
        console.print(f"[yellow]warning:[/] {result['missing']} of {result['n']} problems have no response (scored wrong)")
    if result["extra"]:
        console.print(f"[yellow]warning:[/] {result['extra']} responses name no problem in {data} (ignored)")
    summary = {"benchmark": benchmark.lower(), "data": str(data), "responses": str(responses)}
    summary.update({k: v for k, v in result.items() if k not in ("items", "missing_pids")})
    print(json.dumps(summary, indent=2))


def print_summary(summary: dict) -> None:
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
        it.add_row(
            str(r["iteration"]), str(r["prompts"]), str(r["responses"]), str(r["kept"]),
            f"{100 * r['val_accuracy']:.1f}",
            "-" if r["val_pass_at_k"] is None else f"{100 * r['val_pass_at_k']:.1f}",
            f"{r['temperature']:.2f}", f"{r['seconds']:.0f}",
        )  # fmt: skip
    out.print(it)
    out.print(f"wall {summary['wall_seconds']:.0f} s — {summary['run_dir']}/summary.json")


def main() -> None:  # pragma: no cover
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t0 = time.time()
    try:
        app()
    finally:
        _ = t0
    sys.exit(0)


if __name__ == "__main__":  # pragma: no cover
    main()
