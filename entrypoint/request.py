"""What a run is asked to do, and the job it runs in: the request, its result, the device and topology."""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

from bench.core.problem import Problem
from bench.core.statuses import Criteria, Watchdog
from bench.recipe.levers import LeverRequest
from bench.recipe.render import RecipeOptions
from entrypoint.job.topology import Topology, TopologyError, detect
from entrypoint.launch.supervise import process_age_seconds


@dataclass(frozen=True)
class RunRequest:
    root: Path
    out: Path | None
    criteria: Criteria
    recipe: RecipeOptions
    levers: LeverRequest = LeverRequest()
    device: str = "auto"  # auto | cuda | cpu
    global_batch: int | None = None
    demo: bool = False
    world_size_means: str | None = None
    nproc_per_node: int | None = None
    env: Mapping[str, str] | None = None  # the scheduler's variables; os.environ when None
    image_sample: int | None = 1000  # images decoded before training; None: every image
    watchdog: Watchdog = Watchdog()
    # recipe options the user set (e.g. "per_device_batch", "precision"): a user's config
    # keeps its own values of the others
    asked: frozenset[str] = frozenset()
    # what the command did before the run (demo writing its layout): not the run's time
    setup_seconds: float = 0.0


@dataclass(frozen=True)
class RunResult:
    document: dict  # verdict.json on node 0, node-<rank>.json elsewhere
    path: Path | None  # where it was written; None when nothing could be written
    exit_code: int  # the job's status as this node exits with it


def new_run_id() -> str:
    return f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def run_age_seconds(request: RunRequest) -> float | None:
    """The run's clock: this process's age (interpreter and imports included) less what
    the command did before the run; None without /proc."""
    age = process_age_seconds()
    return None if age is None else round(max(0.0, age - request.setup_seconds), 3)


def resolve_device(requested: str, gpus: int) -> str:
    if requested == "cuda" and gpus == 0:
        raise RuntimeError("--device cuda was asked for, but no CUDA GPU is visible")
    return "cpu" if requested == "cpu" or gpus == 0 else "cuda"


def read_topology(request: RunRequest, gpus: int) -> Topology | Problem:
    """The scheduler's environment read as a node with ``gpus`` GPUs, or why it cannot be."""
    env = os.environ if request.env is None else request.env
    try:
        topology = detect(env, gpus, request.world_size_means, request.nproc_per_node)
    except TopologyError as error:
        fix = (
            "fix the scheduler's variables or set NNODES, NODE_RANK, ADDR, PORT "
            "(llava-bench topology shows the reading)"
        )
        return Problem("environment", str(error), fix)
    if topology.nnodes == 1 and topology.port_defaulted:
        # Nobody else needs to find this node: a free port lets two runs share a machine.
        port = free_port()
        topology = replace(topology, master_port=port, origins={**topology.origins, "master_port": f"free port {port}"})
    return topology


def cpu_refusal(topology: Topology) -> Problem | None:
    """Why ``topology`` cannot train on this machine's CPU, or None."""
    if topology.world_size == 1:
        return None
    return Problem(
        "environment",
        f"{topology.nnodes} node(s) x {topology.nproc_per_node} process(es) on CPU: "
        "XTuner trains on CPU only as one process (mmengine needs CUDA for more)",
        "run on GPUs, or on one node with --nproc-per-node 1",
    )


def run_topology(request: RunRequest, device: str, gpus: int) -> tuple[Topology, list[Problem]]:
    """The topology ``run`` launches on ``device``, or the problems why it cannot."""
    topology = read_topology(request, gpus if device == "cuda" else 0)
    if isinstance(topology, Problem):
        return detect({}, 0), [topology]
    refusal = cpu_refusal(topology) if device == "cpu" else None
    return topology, [refusal] if refusal else []


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
