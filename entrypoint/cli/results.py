"""How a verdict reaches the user (console, --json, --junit) and the commands that
recompute or redraw a stored one: verdict, report."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from bench.core.statuses import EXIT_CODES, Criteria
from bench.verdict import document as verdict_mod
from bench.verdict.what_ran import NOT_RECORDED, what_ran
from entrypoint.cli.options import (
    JsonOption,
    JunitOption,
    a_loss_target,
    console,
    errors,
)


def show_verdict(verdict: dict, path: Path | None, as_json: bool) -> None:
    if as_json:
        print(verdict_mod.dumps(verdict), end="")
        return
    colour = {"pass": "green", "fail": "red"}.get(verdict["status"], "yellow")
    console.print(f"[bold {colour}]{verdict['status'].upper()}[/]: {verdict['reason']}", highlight=False)
    for problem in verdict["problems"]:
        errors.print(f"  - {problem['path']}: {problem['problem']}\n    fix: {problem['fix']}", highlight=False)
    for note in verdict["notes"]:
        console.print(f"  [yellow]note:[/] {escape(note)}", highlight=False)
    speed = (verdict.get("throughput") or {}).get("seconds_per_step") or {}
    if speed.get("median") is not None:
        console.print(
            f"  {speed['median']:.3f} s/step median, {speed['mean']:.3f} mean (the steady window)", highlight=False
        )
    for label, text in what_ran(verdict):
        if text != NOT_RECORDED:
            console.print(f"  [dim]{label}:[/] {escape(text)}", highlight=False)
    if path is not None:
        console.print(f"  written: {path}", highlight=False)


def write_junit(verdict: dict, path: Path) -> None:
    """The JUnit file; a failure to write it is one line and exit 3 (the verdict stands)."""
    from bench.verdict.report import write_junit

    try:
        write_junit(verdict, path)
    except OSError as error:
        errors.print(f"[red]error:[/] --junit {path}: {error.strerror or error}", highlight=False)
        raise typer.Exit(EXIT_CODES["error"]) from None


def run_to_verdict(request, as_json: bool, junit: Path | None = None) -> None:
    from entrypoint.run import execute

    try:
        result = execute(request, errors if as_json else console)
    except RuntimeError as error:  # e.g. --device cuda without GPUs
        errors.print(f"[red]invalid:[/] {error}")
        raise typer.Exit(EXIT_CODES["invalid"]) from None
    except OSError as error:  # not even the verdict could be written (a full or vanished filesystem)
        where = f" at {error.filename}" if error.filename else ""
        errors.print(
            f"[red]error:[/] the results could not be written{where}: {error.strerror or error}", highlight=False
        )
        raise typer.Exit(EXIT_CODES["error"]) from None
    show_verdict(result.document, result.path, as_json)
    if junit is not None:
        write_junit(result.document, junit)
    if result.document["status"] == "aborted":
        # A signal can stop a library mid-operation (a process pool, a lock) and leave the
        # interpreter's shutdown waiting on it forever; the verdict is written: end now,
        # and take along any child the signal left running (it would hold our output open).
        sys.stdout.flush()
        sys.stderr.flush()
        _kill_children()
        os._exit(result.exit_code)
    raise typer.Exit(result.exit_code)


def stored_verdict(run_dir: Path) -> dict:
    """A results folder's verdict.json, schema-checked; exit 2 naming the file if it is
    missing, does not parse or is not a verdict of this schema."""
    import jsonschema

    stored = run_dir / verdict_mod.VERDICT_NAME
    if not stored.is_file():
        errors.print(
            f"[red]invalid:[/] {run_dir} holds no {verdict_mod.VERDICT_NAME}; is it a results/<run_id> folder?"
        )
        raise typer.Exit(EXIT_CODES["invalid"])
    try:
        document = json.loads(stored.read_text())
        verdict_mod.validate(document)
    except (OSError, ValueError, jsonschema.ValidationError) as error:
        why = error.message if isinstance(error, jsonschema.ValidationError) else str(error)
        errors.print(f"[red]invalid:[/] {stored} is not a readable verdict ({why}); run `llava-bench run` again")
        raise typer.Exit(EXIT_CODES["invalid"]) from None
    return document


def verdict(
    path: Annotated[Path, typer.Argument(help="A results/<run_id> folder, or a bare metrics stream (.json/.jsonl).")],
    max_steps: Annotated[
        Optional[int],
        typer.Option(min=1, help=f"Override the recorded max_steps (default {Criteria.max_steps} for a bare stream)."),
    ] = None,
    target_loss: Annotated[
        Optional[float],
        typer.Option(
            callback=a_loss_target,
            help=f"Override the recorded target loss (default {Criteria.target_loss} for a bare stream).",
        ),
    ] = None,
    accumulative_counts: Annotated[int, typer.Option(min=1, help="Micro-iterations per step, for a bare stream.")] = 1,
    junit: JunitOption = None,
    as_json: JsonOption = False,
):
    """Recompute the verdict offline from a results folder or a metrics stream."""
    if not path.exists():
        errors.print(f"[red]invalid:[/] {path} does not exist; give a results/<run_id> folder or a metrics stream")
        raise typer.Exit(EXIT_CODES["invalid"])
    if path.is_dir():
        stored = stored_verdict(path)["criteria"]
        criteria = Criteria(
            target_loss=stored["target_loss"] if target_loss is None else target_loss,
            max_steps=stored["max_steps"] if max_steps is None else max_steps,
            stop_on_target=stored["stop_on_target"],
        )
        result = verdict_mod.recompute(path, criteria)
        if (max_steps, target_loss) == (None, None):  # the run's own criteria: the stored verdict must agree
            for change in verdict_mod.changes_since_the_run(stored_verdict(path), result):
                errors.print(f"[yellow]note:[/] {change}", highlight=False)
    else:
        from bench.verdict.metrics import read_stream

        try:
            records = read_stream(path).records
        except OSError as error:
            records, problem = [], f"cannot be read ({error})"
        else:
            problem = "holds no training record (a JSON line with iter and loss)"
        if not records:
            errors.print(
                f"[red]invalid:[/] {path} {problem}; give a results/<run_id> folder or XTuner's metrics stream"
            )
            raise typer.Exit(EXIT_CODES["invalid"])
        criteria = Criteria(
            target_loss=Criteria.target_loss if target_loss is None else target_loss,
            max_steps=Criteria.max_steps if max_steps is None else max_steps,
        )
        result = verdict_mod.from_stream(path, criteria, accumulative_counts)
    verdict_mod.validate(result)
    show_verdict(result, None, as_json)
    if junit is not None:
        write_junit(result, junit)
    raise typer.Exit(result["exit_code"])


def report(run_dir: Annotated[Path, typer.Argument(help="A results/<run_id> folder holding verdict.json.")]):
    """(Re)draw report.md and loss.png of a results folder from its verdict."""
    from bench.verdict.report import PLOT_NAME, write_report

    stored = stored_verdict(run_dir)
    try:
        path, not_plotted = write_report(run_dir, stored)
    except OSError as error:
        errors.print(f"[red]error:[/] the report could not be written in {run_dir} ({error})")
        raise typer.Exit(EXIT_CODES["error"]) from None
    plot = f"{run_dir / PLOT_NAME}" if not_plotted is None else f"no {PLOT_NAME} ({not_plotted})"
    console.print(f"written: {path} and {plot}", highlight=False)


def _kill_children() -> None:
    """SIGKILL every process this one started that still runs (Linux: /proc lists them)."""
    for children in Path(f"/proc/{os.getpid()}/task").glob("*/children"):
        for pid in children.read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
