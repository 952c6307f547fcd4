"""Fingerprint comparison and the bus-bandwidth formula (nccl-tests' definition)."""

from __future__ import annotations

import pytest

from entrypoint.job.agreement import Fingerprint, differences
from entrypoint.job.collective import bus_bandwidth_gbps

NODE = Fingerprint("0.1.0", "NVIDIA H200", 8, "580.159.04", "r" * 64, "d" * 64, "ok")


def test_equal_nodes_agree():
    assert differences([NODE, NODE, NODE]) == []


def test_each_differing_node_and_field_is_named():
    other_gpu = Fingerprint(**{**NODE.__dict__, "gpu_model": "NVIDIA H100 80GB HBM3", "gpu_count": 4})
    refused = Fingerprint(**{**NODE.__dict__, "preflight": "invalid"})
    lines = differences([NODE, NODE, other_gpu, refused])
    assert len(lines) == 2
    assert lines[0].startswith("node 2 differs: gpu_model 'NVIDIA H100 80GB HBM3' (node 0: 'NVIDIA H200'); gpu_count 4")
    assert lines[1] == "node 3 differs: preflight 'invalid' (node 0: 'ok')"


@pytest.mark.parametrize(
    "size, seconds, ranks, expected",
    [
        (2**30, 0.01, 2, 2**30 / 0.01 * 1.0 / 1e9),  # 2(n-1)/n = 1 for two ranks
        (2**30, 0.01, 8, 2**30 / 0.01 * 1.75 / 1e9),
        (256 * 2**20, 0.002, 4, 256 * 2**20 / 0.002 * 1.5 / 1e9),
    ],
)
def test_bus_bandwidth_is_algbw_times_2_n_minus_1_over_n(size, seconds, ranks, expected):
    assert bus_bandwidth_gbps(size, seconds, ranks) == pytest.approx(expected)


def _exchange_as_node(node_rank: int, port: int, queue) -> None:
    from entrypoint.job.agreement import exchange
    from entrypoint.job.topology import Topology

    topology = Topology(
        nnodes=2, node_rank=node_rank, nproc_per_node=1, master_addr="127.0.0.1", master_port=port, source="test"
    )
    queue.put((node_rank, exchange(topology, "memory-retry", {"out_of_memory": node_rank == 1}, timeout_seconds=60)))


def test_two_nodes_exchange_what_they_saw_and_decide_alike():
    """Two real processes over the store node 0 hosts on master_port + 1: each gets
    both answers in node order, so a failure only node 1 saw reaches node 0 too."""
    import multiprocessing

    from tests.entrypoint.job.test_rendezvous import two_free_ports

    port = two_free_ports()
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    nodes = [context.Process(target=_exchange_as_node, args=(rank, port, queue)) for rank in (0, 1)]
    for node in nodes:
        node.start()
    answers = dict(queue.get(timeout=90) for _ in nodes)
    for node in nodes:
        node.join(timeout=30)
    expected = [{"out_of_memory": False}, {"out_of_memory": True}]
    assert answers == {0: expected, 1: expected}


def test_a_node_waiting_for_an_absent_node_0_says_so_and_gives_up(capsys):
    """Node 1 started alone: it says what it waits for (here every second, 30 s by
    default), with the time left, and refuses at the deadline instead of hanging."""
    import time

    from entrypoint.job.agreement import AgreementError, agree
    from entrypoint.job.topology import Topology
    from tests.entrypoint.job.test_rendezvous import two_free_ports

    port = two_free_ports()
    topology = Topology(
        nnodes=2, node_rank=1, nproc_per_node=1, master_addr="127.0.0.1", master_port=port, source="test"
    )
    started = time.monotonic()
    with pytest.raises(AgreementError, match="no agreement with the other nodes"):
        agree(topology, NODE, "r", [], timeout_seconds=4, report_seconds=1)
    assert time.monotonic() - started < 15
    waits = [line for line in capsys.readouterr().err.splitlines() if "waiting for node 0" in line]
    assert (
        waits
        and waits[0].startswith("llava-bench: node 1 waiting for node 0 through 127.0.0.1:")
        and " s of 4 s" in waits[0]
    )
