"""The stage between the agreement and the trainer's launch: the collective check over
every process (GPUs, more than one process), the tokenized dataset waited for, the
memory levers sized for the run's micro-batches on every node, and the first attempt's
config and command written.
A failure or a signal here ends the run with its verdict (RunEnded)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from rich.console import Console

from bench.core.layout import Layout
from bench.core.statuses import Termination
from bench.recipe.levers import LeverRequest
from bench.recipe.render import RecipeOptions, RenderedRecipe, render
from bench.verdict.run_context import RunContext
from entrypoint import __version__
from entrypoint.finish import RunEnded, aborted
from entrypoint.job.cluster import collective, needs_collective_check
from entrypoint.job.stage import Job
from entrypoint.launch.early_start import EarlyTrainer
from entrypoint.launch.plans import LaunchPlan
from entrypoint.launch.signals import AbortOnSignals, Interrupted
from entrypoint.launch.sizing import Sizing, size_on_every_node
from entrypoint.launch.supervise import process_age_seconds, seconds_since_age
from entrypoint.launch.training import timing_section, write_attempt
from entrypoint.preflight.recipe_record import recipe_record
from entrypoint.preflight.stage import Preflight
from entrypoint.request import RunRequest, run_age_seconds


@dataclass(frozen=True)
class Ready:
    """The first attempt, written and ready to launch."""

    plan: LaunchPlan
    recipe: RenderedRecipe
    options: RecipeOptions
    sizing: Sizing  # the run's micro-batches and what the memory model chose for them
    context: RunContext  # the verdict's context up to the launch
    startup: dict  # the appliance's part of timing.startup
    preflight_seconds: float | None  # the process's age at the launch
    lever_request: LeverRequest  # what the memory retry may re-size (Preflight.lever_request)
    early_trainer: EarlyTrainer | None  # the first attempt's trainer, started beside the checks


def ready_to_train(
    request: RunRequest,
    checked: Preflight,
    job: Job,
    context: RunContext,
    layout: Layout,
    console: Console,
    before_training: AbortOnSignals,
) -> Ready:
    """The run's folder made and announced, the interconnect checked, the tokenized
    dataset waited for, the levers sized and the first attempt written."""
    folder, topology, options, recipe = job.folder, job.topology, checked.options, checked.recipe
    folder.path.mkdir(parents=True, exist_ok=True)
    console.print(
        f"[bold]llava-bench[/] run {context.run_id}: {topology.nnodes} node(s) x {topology.nproc_per_node} x "
        f"{checked.device} (this is node {topology.node_rank}), {options.max_steps} steps, target loss < "
        f"{request.criteria.target_loss}"
    )
    console.print(f"  results: {folder.path}", highlight=False)
    for name, why in checked.levers_held.items():
        console.print(f"  lever {name} held at stock: it needs {why}", highlight=False)
    context = replace(context, recipe=recipe_record(recipe, options, topology.world_size))
    startup, tokenization = dict(job.startup), None
    try:
        if needs_collective_check(checked.device, topology):
            checked_at = process_age_seconds()
            interconnect, failure = collective(topology, folder.path, folder.collective_logs, layout.root)
            startup["interconnect_seconds"] = seconds_since_age(checked_at)
            context = replace(context, interconnect=interconnect)
            if failure:
                crashed = Termination("crashed", f"{failure}; see {folder.collective_logs}")
                raise RunEnded(replace(context, termination=crashed, timing=timing_section(run_age_seconds(request))))
        if checked.tokenization is not None:
            tokenization = checked.tokenization.wait(lambda line: console.print(f"  {line}", highlight=False))
            startup["tokenization"] = tokenization.as_dict()
        before_training.check()
    except Interrupted as stop:  # the run's folder exists: its verdict goes there
        raise RunEnded(replace(context, termination=aborted(stop))) from None
    sizing = size_on_every_node(
        options,
        checked.lever_request,
        tokenization,
        topology,
        checked.inputs["model_shapes"],
        checked.gpu_memory_mib,
        checked.supports_sdpa,
    )
    if sizing.options != options and recipe.source == "template":
        options, recipe = sizing.options, render(layout, sizing.options, __version__)
    context = replace(context, recipe=recipe_record(recipe, options, topology.world_size, sizing))
    if sizing.problem is not None:
        raise RunEnded(replace(context, problems=[sizing.problem.as_dict()]))
    if sizing.memory["sized"]:
        console.print(f"  memory: {sizing.described()}", highlight=False)
    plan = write_attempt(recipe, folder, layout, checked.device, topology)
    context = replace(context, topology={**topology.as_dict(), "launch_command": plan.argv})
    return Ready(
        plan,
        recipe,
        options,
        sizing,
        context,
        startup,
        run_age_seconds(request),
        checked.lever_request,
        checked.early_trainer,
    )
