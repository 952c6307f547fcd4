"""One benchmark run: preflight -> recipe -> launch/supervise -> metrics -> verdict.

Each step is a plain function over plain data; this module only wires them in the
one direction docs/ARCHITECTURE.md shows; where each file goes is the run's folder's
(bench/core/run_folder.py), and one training attempt is entrypoint/launch/training.py.
"""

from __future__ import annotations

import shutil
from contextlib import ExitStack
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from rich.console import Console

from bench.core.layout import Layout
from bench.core.problem import Problem
from bench.core.run_folder import RunFolder
from bench.core.statuses import EXIT_CODES, Termination
from bench.recipe import render
from bench.verdict import document as verdict_mod
from bench.verdict.metrics import MetricsStream, find_stream, read_stream
from bench.verdict.ranks import rank_summaries
from bench.verdict.report import write_report
from bench.verdict.run_context import RunContext
from entrypoint import __version__
from entrypoint.job.agreement import AgreementError, Fingerprint, agree, exchange, share_status
from entrypoint.job.cluster import collective, local_fingerprint, log_tails
from entrypoint.job.topology import Topology
from entrypoint.launch.memory_retry import re_sized_retry, set_aside_first_attempt
from entrypoint.launch.signals import AbortOnSignals, Interrupted, SignalFlag
from entrypoint.launch.sizing import Sizing, size_on_every_node
from entrypoint.launch.supervise import process_age_seconds, utc_now
from entrypoint.launch.training import attempt_trainer_startup, train_attempt, write_attempt
from entrypoint.preflight.environment import gpu_inventory, software
from entrypoint.preflight.layout_checks import check_writable
from entrypoint.preflight.recipe_record import recipe_record
from entrypoint.preflight.stage import preflight
from entrypoint.request import RunRequest, RunResult, new_run_id


def execute(request: RunRequest, console: Console) -> RunResult:
    """One run to its verdict. A signal before training ends it as aborted with a
    verdict (preflight of 558k records takes seconds; the agreement may wait minutes);
    during training the supervisor stops the trainer; after it, what ran is written."""
    layout = Layout.at(request.root)
    results_parent = Path(request.out).absolute() if request.out else layout.results_dir
    try:
        with AbortOnSignals() as before_training, ExitStack() as children:
            return _execute(request, console, layout, results_parent, before_training, children)
    except Interrupted as stop:
        return _aborted_before_training(request, layout, results_parent, stop)


def _aborted(stop: Interrupted) -> Termination:
    return Termination("aborted", f"{stop.signal_name} received before training started; no trainer was launched")


def _aborted_before_training(request: RunRequest, layout: Layout, results_parent: Path, stop: Interrupted) -> RunResult:
    """A signal before the run had a folder: a verdict of its own, where it can be written."""
    context = RunContext(
        run_id=new_run_id(),
        criteria=request.criteria,
        termination=_aborted(stop),
        demo=request.demo,
    )
    verdict = verdict_mod.build(context, MetricsStream([], 0))
    if check_writable(results_parent, layout) or (request.out is None and not layout.root.is_dir()):
        return RunResult(verdict, None, verdict["exit_code"])
    run_dir = results_parent / context.run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    path = verdict_mod.write(run_dir, verdict)
    write_report(run_dir, verdict)
    return RunResult(verdict, path, verdict["exit_code"])


def _execute(
    request: RunRequest,
    console: Console,
    layout: Layout,
    results_parent: Path,
    before_training: AbortOnSignals,
    children: ExitStack,
) -> RunResult:
    imports_seconds = process_age_seconds()
    gpus, gpu_model, driver = gpu_inventory()
    checked = preflight(request, layout, results_parent, gpus, children)
    device, topology, options, problems = checked.device, checked.topology, checked.options, checked.problems
    recipe, inputs, inventory = checked.recipe, checked.inputs, checked.inventory
    fingerprint = local_fingerprint(device, gpus, gpu_model, driver, recipe, inputs, problems)
    run_id, inventories = new_run_id(), [inventory]
    if not any(p.path == "environment" for p in problems):
        try:
            run_id, _, inventories = agree(topology, fingerprint, run_id, inventories[0])
        except AgreementError as error:
            problems.append(
                Problem(
                    "other nodes", str(error), "run the same image, layout and recipe on the same GPUs on every node"
                )
            )
    before_training.check()  # a signal that code on the way swallowed
    startup = {"imports_seconds": imports_seconds, "checks_seconds": _since(imports_seconds)}
    context = RunContext(
        run_id=run_id,
        criteria=request.criteria,
        termination=Termination("unknown"),
        accumulative_counts=options.accumulative_counts,
        per_device_batch=options.per_device_batch,
        world_size=topology.world_size,
        demo=request.demo,
        topology={**topology.as_dict(), "launch_command": []},
        environment={
            "software": software(),
            "gpus": [{"node_rank": rank, **gpu} for rank, node_gpus in enumerate(inventories) for gpu in node_gpus],
        },
        inputs=inputs,
    )
    run_dir = results_parent / run_id
    folder = RunFolder(run_dir, topology.node_rank)
    if problems:
        context = replace(context, problems=[p.as_dict() for p in problems])
        if checked.nowhere_to_write:
            invalid = verdict_mod.build(context, MetricsStream([], 0))
            return RunResult(invalid, None, invalid["exit_code"])
        run_dir.mkdir(parents=True, exist_ok=True)
        return _finish(topology, folder, context, fingerprint, MetricsStream([], 0))
    run_dir.mkdir(parents=True, exist_ok=True)
    console.print(
        f"[bold]llava-bench[/] run {run_id}: {topology.nnodes} node(s) x {topology.nproc_per_node} x {device} "
        f"(this is node {topology.node_rank}), {options.max_steps} steps, target loss < {request.criteria.target_loss}"
    )
    console.print(f"  results: {run_dir}", highlight=False)
    context = replace(context, recipe=recipe_record(recipe, options, topology.world_size))
    tokenization = None
    try:
        if device == "cuda":
            checked_at = process_age_seconds()
            interconnect, failure = collective(topology, run_dir, folder.collective_logs, layout.root)
            startup["interconnect_seconds"] = _since(checked_at)
            context = replace(context, interconnect=interconnect)
            if failure:
                failure += f"; see {folder.collective_logs}"
                now = utc_now()
                context = replace(
                    context,
                    termination=Termination("crashed", failure),
                    timing={
                        "preflight_seconds": process_age_seconds(),
                        "started_at": now,
                        "first_record_at": None,
                        "first_record_seconds": None,
                        "ended_at": now,
                        "wall_seconds": 0.0,
                    },
                )
                return _finish(topology, folder, context, fingerprint, MetricsStream([], 0))
        if checked.tokenization is not None:
            tokenization = checked.tokenization.wait(lambda line: console.print(f"  {line}", highlight=False))
            startup["tokenization"] = tokenization.as_dict()
        before_training.check()
    except Interrupted as stop:  # the run's folder exists: its verdict goes there
        return _finish(
            topology, folder, replace(context, termination=_aborted(stop)), fingerprint, MetricsStream([], 0)
        )
    sizing = size_on_every_node(
        options,
        request.levers,
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
        return _finish(
            topology, folder, replace(context, problems=[sizing.problem.as_dict()]), fingerprint, MetricsStream([], 0)
        )
    if sizing.memory["sized"]:
        console.print(f"  memory: {sizing.described()}", highlight=False)
    plan = write_attempt(recipe, folder, layout, device, topology)
    context = replace(context, topology={**topology.as_dict(), "launch_command": plan.argv})
    preflight_seconds = process_age_seconds()
    run = _Run(request, console, layout, folder, topology, fingerprint, startup, sizing)
    with SignalFlag() as after_training:  # from here on a signal no longer loses what ran
        return _train_and_judge(run, plan, recipe, options, context, preflight_seconds, after_training)


@dataclass(frozen=True)
class _Run:
    """What the stages after preflight share."""

    request: RunRequest
    console: Console
    layout: Layout
    folder: RunFolder
    topology: Topology
    fingerprint: Fingerprint
    startup: dict  # the appliance's part of timing.startup
    sizing: Sizing  # the run's micro-batches and what the memory model chose for them


def _since(seconds: float | None) -> float | None:
    """Seconds since the process was ``seconds`` old (None without /proc)."""
    now = process_age_seconds()
    return None if now is None or seconds is None else round(now - seconds, 3)


def _train_and_judge(run: _Run, plan, recipe, options, context, preflight_seconds, signals: SignalFlag) -> RunResult:
    """Train (once more with the memory levers re-sized after an early out-of-memory
    failure, unless a signal came), then the verdict of what ran; every attempt's time
    is in the verdict."""
    request, console, layout, folder, topology = run.request, run.console, run.layout, run.folder, run.topology
    heads, sizing = context.inputs["model_shapes"]["llm"]["heads"], run.sizing
    outcome, attempt = train_attempt(plan, folder, request, options, console, sizing, heads)
    attempts = [attempt]
    retry = (
        re_sized_retry(topology, outcome, plan.logs_dir, sizing, request.levers, heads)
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
    context = replace(
        context,
        termination=outcome.termination,
        trainer_exit_code=outcome.exit_code,
        rank_times=[rank for answer in answers for rank in answer["ranks"]] or None,
        timing={
            "preflight_seconds": preflight_seconds,
            "earlier_attempts_seconds": round(attempt["launched"] - attempts[0]["launched"], 3),
            "attempts": [{k: v for k, v in a.items() if k != "launched"} for a in attempts],
            "started_at": attempt["started_at"],
            "first_record_at": outcome.first_record_at,
            "first_record_seconds": outcome.first_record_seconds,
            "ended_at": outcome.ended_at,
            "wall_seconds": attempt["wall_seconds"],
            "startup": {**run.startup, "trainer": attempt_trainer_startup(folder.xtuner, attempt["launched"])},
        },
    )
    stream_path = find_stream(folder.xtuner)
    if topology.node_rank == 0:
        if stream_path is not None:
            shutil.copyfile(stream_path, folder.metrics)
        else:
            folder.metrics.write_text("")
    stream = read_stream(folder.metrics) if topology.node_rank == 0 else MetricsStream([], 0)
    return _finish(topology, folder, context, run.fingerprint, stream)


def _finish(
    topology: Topology, folder: RunFolder, context, fingerprint: Fingerprint, stream: MetricsStream
) -> RunResult:
    """Node 0 writes the verdict and tells the others the job's status; they write node-<rank>.json."""
    if topology.node_rank == 0:
        verdict = verdict_mod.build(context, stream)
        path = verdict_mod.write(folder.path, verdict)
        write_report(folder.path, verdict)
        share_status(topology, verdict["status"])
        return RunResult(verdict, path, verdict["exit_code"])
    local = verdict_mod.build(context, stream)
    job_status = share_status(topology, None)
    document = {
        "node_rank": topology.node_rank,
        "run_id": context.run_id,
        "status": job_status or "error",
        "reason": (
            f"node 0 reported the job's status: {job_status}"
            if job_status
            else "node 0 never reported the job's status"
        ),
        "exit_code": EXIT_CODES[job_status or "error"],
        "node_status": local["status"],
        "node_reason": local["reason"],
        "problems": context.problems,
        "termination": local["termination"],
        "fingerprint": asdict(fingerprint),
        "log_tails": log_tails(folder.logs),
    }
    path = folder.node_document
    verdict_mod.write_node_document(path, document)
    return RunResult(document, path, document["exit_code"])
