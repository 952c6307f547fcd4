"""A real multi-node rendezvous on loopback: two appliance processes, one per "node".

Each is given the environment one scheduler would give its node; the appliance
reads it, agrees with the other node over its store on master_port + 1, then starts
torchrun with the computed arguments and a gloo program that all-gathers every
process's place. Nothing is mocked; CUDA is not needed (gloo on CPU).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess

import pytest

from bench.core.layout import Layout
from bench.verdict import document as verdict_mod
from tests.conftest import cli_argv, run_argv

SCHEDULER_VARIABLES = (
    "WORLD_SIZE",
    "RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "NNODES",
    "NODE_RANK",
    "ADDR",
    "PORT",
    "NPROC_PER_NODE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
)


def two_free_ports() -> int:
    """A port P with P + 1 also free (torchrun uses P, the appliance's store P + 1)."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return port
    raise RuntimeError("no two consecutive free ports")


def seed_convention(node: int, port: int) -> dict:
    return {
        "WORLD_SIZE": "2",
        "RANK": str(node),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "NPROC_PER_NODE": "2",
    }


def pytorchjob(node: int, port: int) -> dict:
    return {
        "PET_NNODES": "2",
        "PET_NPROC_PER_NODE": "2",
        "PET_NODE_RANK": str(node),
        "WORLD_SIZE": "4",
        "RANK": str(node),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }


def slurm(node: int, port: int) -> dict:
    return {
        "SLURM_NNODES": "2",
        "SLURM_NODEID": str(node),
        "SLURM_JOB_NODELIST": "localhost,localhost",
        "MASTER_PORT": str(port),
        "NPROC_PER_NODE": "2",
    }


def start_node(root, scheduler_env: dict) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in SCHEDULER_VARIABLES and not k.startswith(("SLURM_", "PET_"))}
    env.update(scheduler_env, GLOO_SOCKET_IFNAME="lo")
    return subprocess.Popen(
        cli_argv("check-cluster", "--root", str(root), "--device", "cpu", "--json"),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_two_nodes(roots, scheduler) -> list[tuple[int, dict, str]]:
    port = two_free_ports()
    nodes = [start_node(root, scheduler(rank, port)) for rank, root in enumerate(roots)]
    results = []
    for node in nodes:
        stdout, stderr = node.communicate(timeout=240)
        results.append((node.returncode, json.loads(stdout), stderr))
    return results


@pytest.mark.parametrize("scheduler", [seed_convention, pytorchjob, slurm], ids=lambda f: f.__name__)
def test_two_nodes_rendezvous_and_every_process_is_placed(synthetic_layout, scheduler):
    results = run_two_nodes([synthetic_layout, synthetic_layout], scheduler)
    for code, report, stderr in results:
        assert code == 0, (report, stderr)
        assert (report["topology"]["nnodes"], report["topology"]["nproc_per_node"]) == (2, 2)
    assert [report["topology"]["node_rank"] for _, report, _ in results] == [0, 1]
    interconnect = results[0][1]["interconnect"]
    assert interconnect["backend"] == "gloo"
    assert interconnect["world_size"] == 4
    placement = [(p["rank"], p["node_rank"], p["local_rank"]) for p in interconnect["placement"]]
    assert placement == [(0, 0, 0), (1, 0, 1), (2, 1, 0), (3, 1, 1)]


def test_a_node_with_a_different_dataset_makes_both_refuse(synthetic_layout, layout_copy):
    records = json.loads(Layout.at(layout_copy).dataset_json.read_text())
    Layout.at(layout_copy).dataset_json.write_text(json.dumps(records[:-1]))  # one record fewer
    results = run_two_nodes([synthetic_layout, layout_copy], seed_convention)
    for code, report, _ in results:
        assert code == 2
        assert report["status"] == "invalid"
        assert report["reason"].startswith("node 1 differs:")
        assert "dataset_sha256" in report["reason"]  # (the recipe differs too: its paths name another root)


def test_run_on_two_nodes_writes_verdict_on_node_0_and_node_json_elsewhere(synthetic_layout, tmp_path):
    """XTuner cannot train multi-process on CPU, so both nodes refuse; node 0 still
    decides the job's status and node 1 exits with it, writing node-1.json."""
    port = two_free_ports()
    nodes = []
    for rank in (0, 1):
        env = {k: v for k, v in os.environ.items() if k not in SCHEDULER_VARIABLES}
        env.update(seed_convention(rank, port), NPROC_PER_NODE="1")
        nodes.append(
            subprocess.Popen(
                [
                    *run_argv(synthetic_layout, tmp_path / f"node{rank}"),
                    "--device",
                    "cpu",
                    "--json",
                ],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outputs = [node.communicate(timeout=240) for node in nodes]
    assert [node.returncode for node in nodes] == [2, 2], outputs
    (verdict_path,) = (tmp_path / "node0").glob("*/verdict.json")
    verdict = json.loads(verdict_path.read_text())
    assert verdict["status"] == "invalid"
    assert "one process" in verdict["problems"][0]["problem"]
    assert verdict["topology"]["nnodes"] == 2
    (node_path,) = (tmp_path / "node1").glob("*/node-1.json")
    node = json.loads(node_path.read_text())
    verdict_mod.validate_node_document(node)
    assert (node["node_rank"], node["status"], node["exit_code"]) == (1, "invalid", 2)
    assert node["reason"] == "node 0 reported the job's status: invalid"
