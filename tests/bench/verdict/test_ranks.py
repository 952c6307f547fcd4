"""Per-rank speed and the straggler report (bench/verdict/ranks.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.verdict.ranks import rank_summaries, ranks_section
from tests.conftest import torchrun_gloo


def _rank(rank: int, seconds: float, node: int = 0) -> dict:
    return {
        "rank": rank,
        "local_rank": rank % 8,
        "node_rank": node,
        "host": f"node{node}",
        "iterations": 90,
        "forward_seconds_mean": seconds,
    }


CASES = {
    "eight even ranks": ([_rank(r, 1.0) for r in range(8)], []),
    "one 4 % behind: within the allowance": ([*(_rank(r, 1.0) for r in range(7)), _rank(7, 1.04)], []),
    "one 6 % behind is named": (
        [*(_rank(r, 1.0) for r in range(7)), _rank(5, 1.06)],
        ["rank 5 (node 0, node0) is 6.0% behind the median rank's forward time"],
    ),
    "a slow node of two": (
        [*(_rank(r, 1.0, 0) for r in range(4)), *(_rank(r, 1.12, 1) for r in range(4, 8))],
        [
            "rank 4 (node 1, node1) is 5.7% behind the median rank's forward time",
            "node 1 is 5.7% behind the median node",
        ],
    ),
    "one rank alone is nobody's straggler": ([_rank(0, 1.0)], []),
}


@pytest.mark.parametrize("summaries, stragglers", CASES.values(), ids=CASES.keys())
def test_the_slowest_rank_is_named_beyond_five_percent(summaries, stragglers):
    assert ranks_section(summaries)["stragglers"] == stragglers


def test_a_slow_node_of_three_is_named_with_its_slowest_rank():
    summaries = [*(_rank(r, 1.0, r // 2) for r in range(4)), _rank(4, 1.2, 2), _rank(5, 1.2, 2)]
    section = ranks_section(summaries)
    assert section["slowest_node"] == {"node_rank": 2, "behind_median": pytest.approx(0.2)}
    assert section["stragglers"] == [
        "rank 4 (node 2, node2) is 20.0% behind the median rank's forward time",
        "node 2 is 20.0% behind the median node",
    ]


def test_nothing_recorded_gives_no_section(tmp_path):
    assert rank_summaries(tmp_path) == [] and ranks_section([]) is None


def test_a_slowed_rank_of_a_real_torchrun_is_named(tmp_path):
    """Three gloo ranks under torchrun, rank 1's forward pass slowed by 20 ms: every
    rank's step waits in the all-reduce, yet its forward time names rank 1."""
    done = torchrun_gloo(Path(__file__).parent / "rank_timing_worker.py", 3, str(tmp_path), "1")
    assert done.returncode == 0, done.stderr[-3000:]
    summaries = rank_summaries(tmp_path)
    assert [s["rank"] for s in summaries] == [0, 1, 2] and all(s["iterations"] == 20 for s in summaries)
    section = ranks_section(summaries)
    assert section["slowest_rank"]["rank"] == 1 and section["slowest_rank"]["behind_median"] > 10
    assert len(section["stragglers"]) == 1 and section["stragglers"][0].startswith("rank 1 (node 0,")
