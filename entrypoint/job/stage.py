"""The job stage: every node's preflight agreed on (a node whose GPUs, driver, recipe or
data differ, or whose preflight refused, makes the run invalid on every node), the
run's id and folder, and the verdict's context as far as the checks know it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bench.core.problem import Problem
from bench.core.run_folder import RunFolder
from bench.core.statuses import Termination
from bench.verdict.run_context import RunContext
from entrypoint.job.agreement import AgreementError, Fingerprint, agree
from entrypoint.job.cluster import local_fingerprint
from entrypoint.job.topology import Topology
from entrypoint.preflight.environment import software
from entrypoint.preflight.stage import Preflight
from entrypoint.request import RunRequest, run_age_seconds


@dataclass(frozen=True)
class Job:
    """What the stages after the agreement share."""

    topology: Topology
    folder: RunFolder  # this node's view of the run's folder
    fingerprint: Fingerprint
    startup: dict  # the appliance's part of timing.startup so far
    writable: bool  # preflight found somewhere to write the run's folder


def form_job(request: RunRequest, checked: Preflight, results_parent: Path) -> tuple[Job, RunContext]:
    """The job every node agreed on (or the problems of its disagreement) and the
    verdict's context so far: status invalid where there are problems."""
    topology, problems = checked.topology, list(checked.problems)
    fingerprint = local_fingerprint(
        checked.device, checked.gpus, checked.gpu_model, checked.driver, checked.recipe, checked.inputs, problems
    )
    run_id, inventories = checked.run_id, [checked.inventory]
    if not any(p.path == "environment" for p in problems):
        try:
            run_id, _, inventories = agree(topology, fingerprint, run_id, checked.inventory)
        except AgreementError as error:
            problems.append(
                Problem(
                    "other nodes", str(error), "run the same image, layout and recipe on the same GPUs on every node"
                )
            )
    now, imported = run_age_seconds(request), checked.imports_seconds  # both on the run's clock
    startup = {
        "imports_seconds": imported,
        "checks_seconds": None if None in (now, imported) else round(now - imported, 3),
    }
    context = RunContext(
        run_id=run_id,
        criteria=request.criteria,
        termination=Termination("unknown"),
        accumulative_counts=checked.options.accumulative_counts,
        per_device_batch=checked.options.per_device_batch,
        world_size=topology.world_size,
        demo=request.demo,
        topology={**topology.as_dict(), "launch_command": []},
        environment={
            "software": software(),
            "gpus": [{"node_rank": rank, **gpu} for rank, node_gpus in enumerate(inventories) for gpu in node_gpus],
        },
        inputs=checked.inputs,
        problems=[p.as_dict() for p in problems],
    )
    folder = RunFolder(results_parent / run_id, topology.node_rank)
    return Job(topology, folder, fingerprint, startup, not checked.nowhere_to_write), context
