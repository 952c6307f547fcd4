"""The commands that read the job without training: topology, check-cluster."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

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
    as_json: JsonOption = False,
):
    """Show how this node reads the scheduler's environment, and the command `run` launches with it."""
    from bench.core.run_folder import RunFolder
    from entrypoint.launch.plans import training_plan
    from entrypoint.preflight.environment import gpu_inventory
    from entrypoint.request import RunRequest, resolve_device, run_topology

    gpus = gpu_inventory()[0]
    device = resolve_device("auto", gpus)
    request = RunRequest(
        root=Path("/llava"),
        out=None,
        criteria=Criteria(),
        recipe=RecipeOptions(),
        world_size_means=world_size_means.value if world_size_means else None,
        nproc_per_node=nproc_per_node,
    )
    decision, problems = run_topology(request, device, gpus)
    if problems:
        errors.print(f"[red]refused:[/] {problems[0].problem}; fix: {problems[0].fix}", highlight=False)
        raise typer.Exit(EXIT_CODES["invalid"])
    folder = RunFolder(Path("<results>/<run_id>"), decision.node_rank)
    try:
        command = training_plan(folder.config, folder.xtuner, folder.logs, Path("/llava"), device, decision).argv
    except FileNotFoundError as error:  # XTuner is not installed here
        errors.print(f"[red]refused:[/] {error}", highlight=False)
        raise typer.Exit(EXIT_CODES["invalid"]) from None
    if as_json:
        print(json.dumps({**decision.as_dict(), "launch_command": command}, indent=2))
        return
    console.print(
        f"[bold]{decision.source}[/]: node {decision.node_rank} of {decision.nnodes}, "
        f"{decision.nproc_per_node} process(es) per node, world size {decision.world_size}",
        highlight=False,
    )
    for name, origin in decision.origins.items():
        console.print(f"  {name:<15} {getattr(decision, name)!s:<20} from {origin}", highlight=False)
    if decision.world_size_reading:
        console.print(f"  WORLD_SIZE read as {decision.world_size_reading}", highlight=False)
    console.print("  launch: " + " ".join(command), highlight=False)


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
