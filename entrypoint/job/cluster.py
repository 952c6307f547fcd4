"""The job as one cluster before training: every node's fingerprint, and one collective
over all processes (placement, and NCCL bus bandwidth on GPUs). `llava-bench
check-cluster` runs this alone; `run` runs the same collective before training."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, replace
from pathlib import Path

from bench.core.inputs import describe
from bench.core.layout import Layout
from bench.core.statuses import EXIT_CODES
from bench.recipe.render import RenderedRecipe, render
from entrypoint import __version__
from entrypoint.job.agreement import AgreementError, Fingerprint, agree
from entrypoint.job.topology import Topology, TopologyError, detect
from entrypoint.launch.plans import torchrun_plan
from entrypoint.launch.supervise import run_to_end
from entrypoint.preflight.environment import gpu_inventory, gpu_inventory_details
from entrypoint.preflight.layout_checks import inspect_layout
from entrypoint.request import RunRequest, new_run_id, resolve_device

COLLECTIVE_TIMEOUT_SECONDS = 300
LOG_TAIL_LINES = 20


def needs_collective_check(device: str, topology: Topology) -> bool:
    """Whether the processes' collective check runs: on GPUs, where a process has a peer
    to reach (a lone one starts its NCCL with the trainer; its GPU is the inventory's)."""
    return device == "cuda" and topology.world_size > 1


def local_fingerprint(
    device, gpus, gpu_model, driver, recipe: RenderedRecipe | None, inputs: dict | None, problems
) -> Fingerprint:
    return Fingerprint(
        appliance_version=__version__,
        gpu_model=gpu_model if device == "cuda" else "cpu",
        gpu_count=gpus if device == "cuda" else 0,
        driver=driver,
        recipe_sha256=recipe.sha256 if recipe else "",
        dataset_sha256=inputs["dataset_sha256"] if inputs else None,
        preflight="ok" if not problems else "invalid",
    )


def check_cluster(request: RunRequest) -> tuple[dict, int]:
    """Rendezvous with every node without training: fingerprints must agree, and one
    collective over all processes must succeed (gloo on CPU, NCCL with bus bandwidth
    on GPUs). Returns (report, exit code); node 0's report holds the placement."""
    import tempfile

    layout = Layout.at(request.root)
    gpus, gpu_model, driver = gpu_inventory()
    device = resolve_device(request.device, gpus)
    env = os.environ if request.env is None else request.env
    try:
        topology = detect(env, gpus if device == "cuda" else 0, request.world_size_means, request.nproc_per_node)
    except TopologyError as error:
        return {"status": "invalid", "reason": str(error)}, EXIT_CODES["invalid"]
    problems, dataset = inspect_layout(layout)
    recipe = None if problems else render(layout, replace(request.recipe, device=device), __version__)
    inputs = None if problems else describe(layout, dataset)
    fingerprint = local_fingerprint(device, gpus, gpu_model, driver, recipe, inputs, problems)
    report = {
        "topology": topology.as_dict(),
        "fingerprint": asdict(fingerprint),
        "problems": [p.as_dict() for p in problems],
    }
    try:
        _, fingerprints, _ = agree(topology, fingerprint, new_run_id(), gpu_inventory_details())
    except AgreementError as error:
        return {**report, "status": "invalid", "reason": str(error)}, EXIT_CODES["invalid"]
    with tempfile.TemporaryDirectory(prefix="llava-bench-check-") as scratch:
        interconnect, failure = collective(topology, Path(scratch), Path(scratch) / "logs", Path(scratch))
        tails = log_tails(Path(scratch) / "logs") if failure else {}
    if failure:
        return {**report, "status": "error", "reason": failure, "log_tails": tails}, EXIT_CODES["error"]
    reason = f"{topology.nnodes} node(s) agree; a collective over {topology.world_size} processes succeeded"
    report = {**report, "status": "ok", "reason": reason, "fingerprints": [asdict(f) for f in fingerprints]}
    return {**report, "interconnect": interconnect}, 0


def log_tails(logs_dir: Path) -> dict[str, list[str]]:
    """The last lines of every log under ``logs_dir``, by its path there."""
    return {
        str(log.relative_to(logs_dir)): log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        for log in sorted(logs_dir.rglob("*.log"))
    }


def collective(topology: Topology, folder: Path, logs_dir: Path, cwd: Path) -> tuple[dict | None, str | None]:
    """One collective over every process of the job (entrypoint/job/collective.py, its
    result in ``folder``): the placement of each and, on GPUs, NCCL bus bandwidth; or
    why it failed."""
    result_path = folder / "collective.json"
    plan = torchrun_plan(topology, ["-m", "entrypoint.job.collective", str(result_path)], logs_dir, cwd)
    exit_code = run_to_end(plan, COLLECTIVE_TIMEOUT_SECONDS)
    if exit_code != 0:
        return None, f"the collective check over all {topology.world_size} processes " + (
            "timed out" if exit_code is None else f"failed (exit {exit_code})"
        )
    return (json.loads(result_path.read_text()) if result_path.exists() else None), None
