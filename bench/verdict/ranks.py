"""Each rank's own speed, and the straggler a buyer's acceptance test must catch.

Under DeepSpeed every rank waits for the slowest in the gradient reduction, so the
step time is the same on every rank and hides which one is slow. A rank's forward
pass holds no collective (ZeRO-2 keeps whole parameters on every rank), so its time is
that rank's own: the trainer times it on every rank (bench/trainer/hooks.py
``RankTimingHook``), and the verdict names the slowest rank, and the slowest node,
when it is more than STRAGGLER_SHARE behind the median (docs/VERDICT.md ``ranks``).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from bench.core.trainer_files import RANK_TIMES_FOLDER

STRAGGLER_SHARE = 0.05
# Micro-iterations left out at the start (the first logged interval: allocator
# warm-up, kernel selection), as the throughput's steady window leaves them out.
WARMUP_ITERATIONS = 10


def rank_summaries(work_dir: Path) -> list[dict]:
    """Each rank's mean forward seconds over its steady iterations, from the files its
    hook wrote (unreadable or empty files are left out: a measurement never fails a run)."""
    summaries = []
    for path in sorted((Path(work_dir) / RANK_TIMES_FOLDER).glob("rank-*.json")):
        try:
            record = json.loads(path.read_text())
            seconds = [float(s) for s in record["forward_seconds"]]
            identity = {key: record[key] for key in ("rank", "local_rank", "node_rank", "host")}
        except (OSError, ValueError, KeyError, TypeError):
            continue
        steady = seconds[WARMUP_ITERATIONS:] if len(seconds) > WARMUP_ITERATIONS else seconds
        if steady:
            summaries.append({**identity, "iterations": len(steady), "forward_seconds_mean": statistics.fmean(steady)})
    return summaries


def _behind(seconds: float, median: float) -> float:
    return seconds / median - 1 if median > 0 else 0.0


def ranks_section(summaries: list[dict] | None) -> dict | None:
    """Per-rank forward times, the median, and the slowest rank and node with how far
    behind the median they are; ``straggler`` names them when that is over STRAGGLER_SHARE."""
    if not summaries:
        return None
    per_rank = sorted({s["rank"]: s for s in summaries}.values(), key=lambda s: s["rank"])
    median = statistics.median(s["forward_seconds_mean"] for s in per_rank)
    slowest = max(per_rank, key=lambda s: s["forward_seconds_mean"])
    nodes: dict[int, list[float]] = {}
    for summary in per_rank:
        nodes.setdefault(summary["node_rank"], []).append(summary["forward_seconds_mean"])
    node_means = {node: statistics.fmean(times) for node, times in sorted(nodes.items())}
    node_median = statistics.median(node_means.values())
    slowest_node = max(node_means, key=node_means.get)
    slowest_rank = {
        "rank": slowest["rank"],
        "node_rank": slowest["node_rank"],
        "host": slowest["host"],
        "behind_median": _behind(slowest["forward_seconds_mean"], median),
    }
    slowest_node_entry = {"node_rank": slowest_node, "behind_median": _behind(node_means[slowest_node], node_median)}
    stragglers = []
    if len(per_rank) > 1 and slowest_rank["behind_median"] > STRAGGLER_SHARE:
        stragglers.append(
            f"rank {slowest['rank']} (node {slowest['node_rank']}, {slowest['host']}) is "
            f"{slowest_rank['behind_median']:.1%} behind the median rank's forward time"
        )
    if len(node_means) > 1 and slowest_node_entry["behind_median"] > STRAGGLER_SHARE:
        stragglers.append(f"node {slowest_node} is {slowest_node_entry['behind_median']:.1%} behind the median node")
    return {
        "measure": "forward pass seconds per micro-iteration, steady iterations, mean per rank",
        "per_rank": per_rank,
        "median_forward_seconds": median,
        "slowest_rank": slowest_rank,
        "slowest_node": slowest_node_entry if len(node_means) > 1 else None,
        "straggler_share": STRAGGLER_SHARE,
        "stragglers": stragglers,
    }
