"""What the commands share: the consoles, the choices, the common options and their checks,
and the lever options, one per lever (bench/recipe/levers.py LEVER_HELP)."""

from __future__ import annotations

import inspect
import math
import os
from dataclasses import fields
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from bench.recipe.levers import LEVER_HELP, STOCK, LeverRequest, Levers
from entrypoint.tools.perf import VARIANTS

# soft_wrap: never break a long path in the middle; users copy them.
console = Console(soft_wrap=True)

errors = Console(stderr=True, soft_wrap=True)


class Precision(str, Enum):
    nf4 = "nf4"
    bf16 = "bf16"


class WorldSizeMeans(str, Enum):
    nodes = "nodes"
    processes = "processes"


# `llava-bench perf` variants (entrypoint/tools/perf.py VARIANTS).
Variant = Enum("Variant", {name: name for name in VARIANTS}, type=str)


class Device(str, Enum):
    auto = "auto"
    cuda = "cuda"
    cpu = "cpu"


RootOption = Annotated[Path, typer.Option("--root", help="The mounted layout (data/, model/, results/).")]

JsonOption = Annotated[bool, typer.Option("--json", metavar="", help="Print one JSON document instead of text.")]

WorldSizeOption = Annotated[
    Optional[WorldSizeMeans],
    typer.Option(help="How to read WORLD_SIZE when nothing else says: nodes (the seed's convention) or processes."),
]


def a_writable_file(path: Path | None) -> Path | None:
    """An output file whose folder exists and can be written, checked before any work."""
    if path is not None:
        folder = path.absolute().parent
        if path.is_dir() or not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
            raise typer.BadParameter(
                f"{path}: {'a folder' if path.is_dir() else f'{folder} is not a writable folder'}; name a file in one"
            )
    return path


JunitOption = Annotated[
    Optional[Path], typer.Option(callback=a_writable_file, help="Also write the verdict as JUnit XML to this file.")
]

NprocOption = Annotated[Optional[int], typer.Option(min=1, help="Processes per node (default: visible GPUs).")]


def a_loss_target(value: float | None) -> float | None:
    """A target the loss can fall below: finite and above 0 (checked before any work)."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise typer.BadParameter(f"{value} is not a loss a run can fall below: give a finite number above 0")
    return value


def with_lever_options(command):
    """``command`` with one option per lever (bench.recipe.levers.LEVER_HELP) where its
    ``levers`` parameter stands, handed to it as one LeverRequest: a new lever needs
    no edit here."""
    signature = inspect.signature(command, eval_str=True)
    parameters = list(signature.parameters.values())
    switches = {lever.name: isinstance(getattr(STOCK, lever.name), bool) for lever in fields(Levers)}
    at = [parameter.name for parameter in parameters].index("levers")
    parameters[at : at + 1] = [
        inspect.Parameter(
            name,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            default=None,
            annotation=Annotated[
                Optional[bool if switch else int],
                typer.Option(metavar="", help=LEVER_HELP[name])
                if switch
                else typer.Option(min=0, help=LEVER_HELP[name]),
            ],
        )
        for name, switch in switches.items()
    ]

    def with_levers(**arguments):
        return command(levers=LeverRequest(**{name: arguments.pop(name) for name in switches}), **arguments)

    with_levers.__signature__ = signature.replace(parameters=parameters)
    with_levers.__name__, with_levers.__doc__ = command.__name__, command.__doc__
    return with_levers
