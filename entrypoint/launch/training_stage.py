"""The training stage: the first attempt, once more with the memory levers re-sized
after an early out-of-memory failure (unless a signal came), then what ran gathered for
the verdict: every attempt's time, each rank's speed from every node, the metrics
stream copied beside the verdict (node 0)."""

from __future__ import annotations

import shutil
from dataclasses import replace

from rich.console import Console

from bench.core.layout import Layout
from bench.recipe.render import render
from bench.verdict.metrics import MetricsStream, find_stream, read_stream
from bench.verdict.ranks import rank_summaries
from bench.verdict.run_context import RunContext
from entrypoint import __version__
from entrypoint.job.agreement import exchange
from entrypoint.job.stage import Job
from entrypoint.launch.before_training import Ready
from entrypoint.launch.memory_retry import re_sized_retry, set_aside_first_attempt
from entrypoint.launch.signals import SignalFlag
from entrypoint.launch.training import (
    attempt_trainer_startup,
    early_start_record,
    timing_section,
    train_attempt,
    write_attempt,
)
from entrypoint.preflight.recipe_record import recipe_record
from entrypoint.request import RunRequest


def train(
    request: RunRequest, job: Job, ready: Ready, layout: Layout, console: Console, signals: SignalFlag
) -> tuple[RunContext, MetricsStream]:
    """Train, then the verdict's context and stream of what ran; every attempt's time is in it."""
    folder, topology, context = job.folder, job.topology, ready.context
    plan, recipe, options, sizing = ready.plan, ready.recipe, ready.options, ready.sizing
    heads = context.inputs["model_shapes"]["llm"]["heads"]
    outcome, attempt = train_attempt(plan, folder, request, options, console, sizing, heads, ready.early_trainer)
    attempts = [attempt]
    retry = (
        re_sized_retry(topology, outcome, plan.logs_dir, sizing, ready.lever_request, heads)
        if recipe.source == "template" and signals.received is None
        else None
    )
    if retry is not None:
        levers, first_attempt = retry
        first_attempt = {
            "reason": outcome.termination.detail,
            "folder": set_aside_first_attempt(folder).name,
            "config_sha256": recipe.sha256,
            "levers": options.levers.as_dict(),
            "wall_seconds": attempt["wall_seconds"],
            **first_attempt,
        }
        console.print(
            "[yellow]out of GPU memory before the first logged step[/] with the appliance's memory levers "
            f"({', '.join(first_attempt['taken_back'])} after a shortfall of {first_attempt['shortfall_mib']:,.0f} "
            "MiB); restarting once with them re-sized",
            highlight=False,
        )
        options = replace(options, levers=levers)
        sizing = replace(sizing, options=options)
        recipe = render(layout, options, __version__)
        plan = write_attempt(recipe, folder, layout, options.device, topology)
        outcome, attempt = train_attempt(plan, folder, request, options, console, sizing, heads)
        attempts.append(attempt)
        context = replace(
            context,
            recipe={**recipe_record(recipe, options, topology.world_size, sizing), "memory_fallback": first_attempt},
        )
    local_ranks = {"ranks": rank_summaries(folder.xtuner)}
    answers = exchange(topology, "rank-times", local_ranks) or [local_ranks]  # this node's, if one never answered
    startup = {
        **ready.startup,
        # the counted attempt's: a retry launches afresh
        "early_start": early_start_record(ready.early_trainer, folder.xtuner) if len(attempts) == 1 else None,
        "trainer": attempt_trainer_startup(folder.xtuner, attempt["launched"]),
    }
    context = replace(
        context,
        termination=outcome.termination,
        trainer_exit_code=outcome.exit_code,
        rank_times=[rank for answer in answers for rank in answer["ranks"]] or None,
        timing=timing_section(ready.preflight_seconds, attempts, outcome, startup),
    )
    if topology.node_rank != 0:
        return context, MetricsStream([], 0)
    stream_path = find_stream(folder.xtuner)
    if stream_path is not None:
        shutil.copyfile(stream_path, folder.metrics)
    else:
        folder.metrics.write_text("")
    return context, read_stream(folder.metrics)
