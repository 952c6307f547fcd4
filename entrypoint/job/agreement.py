"""Cross-node agreement over a small key-value store hosted by node 0.

Before training, every node publishes its fingerprint; a node whose GPUs, driver,
recipe, dataset or appliance differ from node 0's makes every node refuse, naming
it. Node 0 also hands out the job's run id, so all nodes write under one name.
After training, node 0 publishes the job's status so every node exits with it.

The store listens on master_port + 1, leaving master_port to torchrun's own
rendezvous (a torchrun agent that reached this store instead would hang).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from datetime import timedelta

from entrypoint.job.schedulers import STORE_PORT_OFFSET
from entrypoint.job.topology import Topology

# Waits for the other nodes run in tries this long, so that a signal is acted on
# between them, and say what they wait for this often.
TRY_SECONDS = 2.0
REPORT_SECONDS = 30.0


class AgreementError(RuntimeError):
    """The nodes do not describe the same job."""


@dataclass(frozen=True)
class Fingerprint:
    """What must be equal on every node for the result to mean one thing."""

    appliance_version: str
    gpu_model: str  # "cpu" without GPUs
    gpu_count: int
    driver: str | None
    recipe_sha256: str
    dataset_sha256: str | None
    preflight: str  # "ok" or "invalid": a node that refuses makes every node refuse


class _Wait:
    """A wait for the other nodes, in short tries, with a line on stderr every
    REPORT_SECONDS saying what it waits for and how much of its time is left."""

    def __init__(self, topology: Topology, what: str, timeout_seconds: float, report_seconds: float = REPORT_SECONDS):
        self.topology, self.what, self.timeout = topology, what, timeout_seconds
        self.started = self.reported = time.monotonic()
        self.report_seconds = report_seconds

    def tick(self, error: RuntimeError) -> None:
        """After a try timed out: say so now and then (a try can outlast a report's
        interval), and give up past the deadline."""
        now = time.monotonic()
        if now - self.reported >= self.report_seconds:
            self.reported = now
            where = f"{self.topology.master_addr}:{self.topology.master_port + STORE_PORT_OFFSET}"
            print(
                f"llava-bench: node {self.topology.node_rank} waiting for {self.what} through {where}: "
                f"{now - self.started:.0f} s of {self.timeout:.0f} s",
                file=sys.stderr,
                flush=True,
            )
        if now - self.started >= self.timeout:
            raise error

    def remaining(self) -> float:
        return max(0.1, min(TRY_SECONDS, self.timeout - (time.monotonic() - self.started)))


def _store(topology: Topology, wait: _Wait):
    """Node 0 hosts the store; the others connect to it, try by try."""
    from torch.distributed import TCPStore

    while True:
        try:
            return TCPStore(
                topology.master_addr,
                topology.master_port + STORE_PORT_OFFSET,
                world_size=topology.nnodes,
                is_master=topology.node_rank == 0,
                timeout=timedelta(seconds=wait.timeout if topology.node_rank == 0 else wait.remaining()),
                wait_for_workers=False,
            )
        except RuntimeError as error:
            if topology.node_rank == 0:
                raise
            wait.tick(error)


def _get(store, key: str, wait: _Wait) -> bytes:
    while True:
        try:
            store.wait([key], timedelta(seconds=wait.remaining()))
            return store.get(key)
        except RuntimeError as error:
            wait.tick(error)


def _release(store, topology: Topology, key: str, wait: _Wait) -> None:
    """Node 0 keeps the store up until every node has read what it needs."""
    store.add(key, 1)
    if topology.node_rank != 0:
        return
    while store.add(key, 0) < topology.nnodes and time.monotonic() - wait.started < wait.timeout:
        time.sleep(0.05)


def differences(fingerprints: list[Fingerprint]) -> list[str]:
    """One line per node that differs from node 0, naming the fields."""
    reference = asdict(fingerprints[0])
    lines = []
    for rank, fingerprint in enumerate(fingerprints[1:], start=1):
        fields = [
            f"{name} {value!r} (node 0: {reference[name]!r})"
            for name, value in asdict(fingerprint).items()
            if value != reference[name]
        ]
        if fields:
            lines.append(f"node {rank} differs: " + "; ".join(fields))
    return lines


def agree(
    topology: Topology,
    fingerprint: Fingerprint,
    run_id: str,
    inventory: list,
    timeout_seconds: float = 600,
    report_seconds: float = REPORT_SECONDS,
) -> tuple[str, list[Fingerprint], list[list]]:
    """(the job's run id, every node's fingerprint, every node's GPU inventory), or
    AgreementError on any fingerprint difference (inventories hold UUIDs: not compared).

    ``run_id`` is this node's proposal; node 0's wins. A single-node job agrees with
    itself without any network.
    """
    if topology.nnodes == 1:
        return run_id, [fingerprint], [inventory]
    wait = _Wait(
        topology,
        "the other nodes' fingerprints" if topology.node_rank == 0 else "node 0",
        timeout_seconds,
        report_seconds,
    )
    try:
        store = _store(topology, wait)
        store.set(f"fingerprint/{topology.node_rank}", json.dumps(asdict(fingerprint)))
        store.set(f"inventory/{topology.node_rank}", json.dumps(inventory))
        if topology.node_rank == 0:
            store.set("run_id", run_id)
        job_run_id = _get(store, "run_id", wait).decode()
        fingerprints = [
            Fingerprint(**json.loads(_get(store, f"fingerprint/{rank}", wait))) for rank in range(topology.nnodes)
        ]
        inventories = [json.loads(_get(store, f"inventory/{rank}", wait)) for rank in range(topology.nnodes)]
        _release(store, topology, "agreed", wait)
    except RuntimeError as error:  # the store's timeouts and connection failures
        raise AgreementError(
            f"no agreement with the other nodes through {topology.master_addr}:"
            f"{topology.master_port + STORE_PORT_OFFSET} within {timeout_seconds:.0f} s ({error}); "
            "check that every node started and that the port is reachable"
        ) from None
    problems = differences(fingerprints)
    if problems:
        raise AgreementError("; ".join(problems))
    return job_run_id, fingerprints, inventories


def share_status(topology: Topology, status: str | None, timeout_seconds: float = 600) -> str | None:
    """Node 0 publishes the job's status; the others return it (None if node 0 never says)."""
    if topology.nnodes == 1:
        return status
    wait = _Wait(
        topology,
        "the other nodes to read the job's status" if topology.node_rank == 0 else "node 0's status",
        timeout_seconds,
    )
    try:
        store = _store(topology, wait)
        if topology.node_rank == 0:
            store.set("status", status)
        shared = _get(store, "status", wait).decode()
        _release(store, topology, "status_read", wait)
        return shared
    except RuntimeError:
        return None


def exchange(topology: Topology, key: str, value: dict, timeout_seconds: float = 600) -> list[dict] | None:
    """Every node's ``value`` under ``key``, in node order, so that all nodes decide alike
    (whether to retry a failed attempt); None if some node never answered."""
    if topology.nnodes == 1:
        return [value]
    wait = _Wait(topology, f"every node's {key}", timeout_seconds)
    try:
        store = _store(topology, wait)
        store.set(f"{key}/{topology.node_rank}", json.dumps(value))
        answers = [json.loads(_get(store, f"{key}/{rank}", wait)) for rank in range(topology.nnodes)]
        _release(store, topology, f"{key}/read", wait)
        return answers
    except RuntimeError:
        return None
