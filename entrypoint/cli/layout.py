"""The commands that make or check a layout: synth, prepare, validate."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from bench.core.inputs import DatasetJson
from bench.core.layout import Layout
from bench.core.statuses import EXIT_CODES
from bench.synth.spec import DEMO_SAMPLES, SynthSpec
from entrypoint.cli.options import (
    JsonOption,
    RootOption,
    console,
    errors,
)
from entrypoint.preflight.layout_checks import check_layout, inspect_layout


def synth(
    directory: Annotated[Path, typer.Argument(help="Empty or new folder to write the synthetic layout into.")],
    samples: Annotated[
        int, typer.Option(min=512, help="Image-caption records (enough for XTuner's 3 % warm-up to span an iteration).")
    ] = DEMO_SAMPLES,
    seed: Annotated[int, typer.Option(help="Seed; the same seed writes the same layout.")] = 0,
):
    """Write a tiny synthetic layout with the real folder structure (tiny models: the LLM briefly trained on the
    captions, the rest random)."""
    layout = write_synthetic(directory, SynthSpec(samples=samples, seed=seed))
    console.print(f"synthetic layout with {samples} samples written to {layout.root}", highlight=False)


def write_synthetic(folder: Path, spec: SynthSpec) -> Layout:
    """The synthetic layout, or exit 2 naming the folder that cannot take it."""
    from bench.synth.writer import write_synthetic_layout

    try:
        return write_synthetic_layout(folder, spec)
    except FileExistsError as error:
        errors.print(f"[red]invalid:[/] {error}")
    except OSError as error:
        errors.print(
            f"[red]invalid:[/] the synthetic layout cannot be written to {folder} ({error}); choose a writable folder"
        )
    raise typer.Exit(EXIT_CODES["invalid"])


class Part(str, Enum):
    models = "models"
    dataset = "dataset"


def prepare(
    root: Annotated[
        Path,
        typer.Option(
            "--root", help="Where to lay out data/ and model/ (created if missing), as the other commands read it."
        ),
    ] = Path("/llava"),
    only: Annotated[Optional[Part], typer.Option(help="Only the models or only the dataset.")] = None,
    revision: Annotated[
        Optional[list[str]],
        typer.Option(help="Pin a repo: REPO=REVISION (e.g. internlm/internlm2-chat-20b=<commit>); repeatable."),
    ] = None,
):
    """Download the models and LLaVA-Pretrain from the hub (HF_ENDPOINT, HF_TOKEN honoured), unpack, validate."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

    from entrypoint.tools.prepare import PrepareError
    from entrypoint.tools.prepare import prepare as prepare_layout

    pins = {}
    for pin in revision or []:
        repo, separator, rev = pin.partition("=")
        if not separator or not rev:
            errors.print(f"[red]invalid:[/] --revision {pin!r}: write REPO=REVISION")
            raise typer.Exit(EXIT_CODES["invalid"])
        pins[repo] = rev
    with Progress(
        "unpacking images.zip", BarColumn(), DownloadColumn(), TimeRemainingColumn(), console=errors, transient=True
    ) as bar:
        task = bar.add_task("unpack", total=None)
        try:
            done = prepare_layout(
                root,
                only.value if only else None,
                pins,
                say=lambda line: console.print(line, highlight=False),
                progress=lambda completed, total: bar.update(task, completed=completed, total=total),
            )
        except PrepareError as error:
            errors.print(f"[red]prepare stopped:[/] {error}", highlight=False)
            raise typer.Exit(EXIT_CODES["invalid"]) from None
    problems = check_layout(Layout.at(root))
    if not problems:  # outside the progress bar: the tokenization forks a process a core
        from entrypoint.preflight.tokenized_cache import prepare_tokenized

        console.print("tokenizing the dataset for the runs", highlight=False)
        done.append(prepare_tokenized(Layout.at(root)))
    for line in done:
        console.print(f"  done: {line}", highlight=False)
    for problem in problems:
        errors.print(f"  left: {problem.path}: {problem.problem}\n    fix: {problem.fix}", highlight=False)
    if not problems:
        console.print(f"[green]valid layout[/] {Layout.at(root).root}", highlight=False)
    raise typer.Exit(EXIT_CODES["invalid"] if problems else 0)


def validate(
    root: RootOption = Path("/llava"),
    out: Annotated[
        Optional[Path],
        typer.Option(help="Where run will write results (default: <root>/results): checked for writing."),
    ] = None,
    deep: Annotated[
        bool,
        typer.Option(
            metavar="",
            help="Also check every record, decode every image, check model indexes and shapes, import the LLM's code.",
        ),
    ] = False,
    sample: Annotated[
        Optional[int], typer.Option(min=1, help="With --deep: decode only this many images (a seeded sample).")
    ] = None,
    as_json: JsonOption = False,
):
    """Check the layout before any model is loaded (seconds; --deep: minutes); list every problem."""
    from bench.core.problem import Problem
    from bench.recipe.schedule import warmup_problem
    from entrypoint.preflight.layout_checks import check_writable

    if sample is not None and not deep:
        errors.print("[red]invalid:[/] --sample chooses the images --deep decodes; add --deep, or leave it out")
        raise typer.Exit(EXIT_CODES["invalid"])
    layout = Layout.at(root)
    problems, dataset = inspect_layout(layout)
    if layout.root.is_dir():
        problems += check_writable(out.absolute() if out else layout.results_dir, layout)
    # Too few records for the pinned schedule's warm-up even on one process at batch 1:
    # no run of this layout can train (a user's config keeps its own schedule).
    too_few = (
        dataset
        and dataset.records
        and not layout.config_override.is_file()
        and warmup_problem(len(dataset.records), 1, 1)
    )
    if too_few:
        problems.append(Problem(str(layout.dataset_json), too_few, "use the whole LLaVA-Pretrain JSON"))
    checked = {"records": len(dataset.records) if dataset else None, "images_decoded": None, "model_code": None}
    if deep and not problems:
        problems, checked["images_decoded"] = deep_with_progress(layout, dataset, sample)
        checked["model_code"] = "imported" if not problems else None
    elif deep and dataset is not None:  # the rest needs a sound layout; the records are checked anyway
        from entrypoint.preflight.deep import record_problems

        problems += record_problems(dataset.records, layout.dataset_json)
    if as_json:
        document = {"root": str(layout.root), "valid": not problems, "checked": checked}
        print(json.dumps({**document, "problems": [p.as_dict() for p in problems]}, indent=2))
    elif problems:
        errors.print(f"[red]invalid layout[/] {layout.root}: {len(problems)} problem(s)", highlight=False)
        for problem in problems:
            errors.print(f"  - {problem.path}: {problem.problem}\n    fix: {problem.fix}", highlight=False)
    else:
        console.print(f"[green]valid layout[/] {layout.root}: {_what_was_checked(checked)}", highlight=False)
    raise typer.Exit(EXIT_CODES["invalid"] if problems else 0)


def _what_was_checked(checked: dict) -> str:
    if checked["images_decoded"] is None:
        return (
            f"the files are in place and the dataset JSON reads ({checked['records']:,} records); --deep also checks "
            "every record, decodes the images, reads the model weights' indexes and shapes and imports the LLM's code"
        )
    return (
        f"{checked['records']:,} records checked, {checked['images_decoded']:,} images decoded, the model weights' "
        "indexes and shapes read, the LLM's code imported"
    )


def deep_with_progress(layout: Layout, dataset: DatasetJson, sample: int | None):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from entrypoint.preflight.deep import deep_problems
    from entrypoint.preflight.model_code import ModelCodeProbe

    with Progress(
        "decoding images", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=errors, transient=True
    ) as bar:
        task = bar.add_task("decode", total=None)
        decoded = [0]

        def progress(done: int, total: int) -> None:
            decoded[0] = done
            bar.update(task, completed=done, total=total)

        with ModelCodeProbe(layout.llm_dir) as probe:
            problems = deep_problems(layout, dataset, sample, progress=progress)
            return problems + probe.result().problems, decoded[0]
