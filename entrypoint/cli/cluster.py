"""The commands that read the job without training: topology, check-cluster."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from bench.core.statuses import EXIT_CODES, Criteria
from bench.recipe.render import RecipeOptions
from entrypoint.cli.options import (
    Device,
    JsonOption,
    NprocOption,
    RootOption,
    WorldSizeOption,
    console,
    errors,
)


def topology(
    world_size_means: WorldSizeOption = None,
    nproc_per_node: NprocOption = None,
    gpus: Annotated[
        Optional[int],
        typer.Option(
            min=1,
            help="Preview the node as if it had this many GPUs (default: the visible ones), e.g. on a login node.",
        ),
    ] = None,
    as_json: JsonOption = False,
):
    """Preview how this node reads the scheduler's environment, the command `run` launches with it, and whether
    `run` would refuse it on this machine."""
    from bench.core.problem import Problem
    from bench.core.run_folder import RunFolder
    from entrypoint.launch.plans import training_plan
    from entrypoint.preflight.environment import gpu_inventory
    from entrypoint.request import RunRequest, cpu_refusal, read_topology, resolve_device

    visible = gpu_inventory()[0]
    previewed = visible if gpus is None else gpus
    request = RunRequest(
        root=Path("/llava"),
        out=None,
        criteria=Criteria(),
        recipe=RecipeOptions(),
        world_size_means=world_size_means.value if world_size_means else None,
        nproc_per_node=nproc_per_node,
    )
    device = resolve_device("auto", previewed)
    decision = read_topology(request, previewed)
    if isinstance(decision, Problem):  # the environment itself cannot be read
        errors.print(f"[red]refused:[/] {decision.problem}; fix: {decision.fix}", highlight=False)
        raise typer.Exit(EXIT_CODES["invalid"])
    refusal = cpu_refusal(decision) if device == "cpu" else None
    here = None
    if previewed != visible:
        here = {"problem": f"{visible} GPU(s) visible here, the preview assumed {gpus}", "fix": "run it where they are"}
    elif refusal is not None:
        here = {"problem": refusal.problem, "fix": refusal.fix}
    folder = RunFolder(Path("<results>/<run_id>"), decision.node_rank)
    command = None
    if refusal is None:
        try:
            command = training_plan(folder.config, folder.xtuner, folder.logs, Path("/llava"), device, decision).argv
        except FileNotFoundError as error:  # XTuner is not installed here
            here = {"problem": str(error), "fix": "run inside the image"}
    if as_json:
        preview = {"gpus": previewed, "gpus_from": "visible" if gpus is None else "--gpus", "run_here": here}
        print(json.dumps({**decision.as_dict(), "launch_command": command, **preview}, indent=2))
        return
    console.print(
        f"[bold]{decision.source}[/]: node {decision.node_rank} of {decision.nnodes}, "
        f"{decision.nproc_per_node} process(es) per node, world size {decision.world_size}"
        + ("" if gpus is None else f" (previewed with {gpus} GPU(s))"),
        highlight=False,
    )
    for name, origin in decision.origins.items():
        console.print(f"  {name:<15} {getattr(decision, name)!s:<20} from {origin}", highlight=False)
    if decision.world_size_reading:
        console.print(f"  WORLD_SIZE read as {decision.world_size_reading}", highlight=False)
    if command is not None:
        console.print("  launch: " + " ".join(command), highlight=False)
    if here is not None:
        console.print(
            f"  [yellow]run here would refuse:[/] {escape(here['problem'])}; fix: {escape(here['fix'])}",
            highlight=False,
        )


def check_cluster_command(
    root: RootOption = Path("/llava"),
    device: Annotated[
        Device, typer.Option(help="auto: every visible GPU, else CPU processes with gloo.")
    ] = Device.auto,
    world_size_means: WorldSizeOption = None,
    nproc_per_node: NprocOption = None,
    as_json: JsonOption = False,
):
    """Rendezvous with every node without training: same fingerprints, one collective over all processes."""
    from entrypoint.job.cluster import check_cluster
    from entrypoint.request import RunRequest

    request = RunRequest(
        root=root,
        out=None,
        criteria=Criteria(),
        recipe=RecipeOptions(),
        device=device.value,
        world_size_means=world_size_means.value if world_size_means else None,
        nproc_per_node=nproc_per_node,
    )
    report, exit_code = check_cluster(request)
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        (console if exit_code == 0 else errors).print(f"{report['status']}: {report['reason']}", highlight=False)
        allreduce = (report.get("interconnect") or {}).get("allreduce")
        if allreduce:
            console.print(f"  all-reduce bus bandwidth {allreduce['bus_bandwidth_gbps']:.1f} GB/s", highlight=False)
    raise typer.Exit(exit_code)
