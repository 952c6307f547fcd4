"""The out-of-memory retry's decisions: whether every node restarts and by how much the
levers are re-sized, and where the failed attempt's files go (docs/PERFORMANCE.md,
"When the memory model is wrong")."""

from __future__ import annotations

from pathlib import Path

from bench.core.run_folder import RunFolder
from bench.recipe.lever_sizing import memory_retry
from bench.recipe.levers import MEMORY_LEVERS, LeverRequest
from entrypoint.job.agreement import exchange
from entrypoint.job.topology import Topology
from entrypoint.launch.diagnose import OUT_OF_MEMORY, logs_report, out_of_memory_shortfall_mib


def retry_agreed(topology: Topology, outcome, logs_dir: Path) -> float | None:
    """Whether every node restarts: all crashed, one ran out of GPU memory, and node 0
    (the node that reads the metrics) saw no step logged. The nodes exchange what they
    saw; the answer is the most memory any node's failure said it lacked (MiB), which
    the retry's levers are re-sized by, or None for no retry."""
    seen = {
        "crashed": outcome.termination.kind == "crashed",
        "out_of_memory": logs_report(logs_dir, OUT_OF_MEMORY),
        "stepped": outcome.first_record_at is not None,
        "shortfall_mib": out_of_memory_shortfall_mib(logs_dir),
    }
    answers = exchange(topology, "memory-retry", seen)
    if answers is None:
        return None
    agreed = all(a["crashed"] for a in answers) and any(a["out_of_memory"] for a in answers)
    return max(a["shortfall_mib"] for a in answers) if agreed and not answers[0]["stepped"] else None


def re_sized_retry(topology: Topology, outcome, logs_dir: Path, sizing, request: LeverRequest, heads: int):
    """The retry's levers and what the verdict says of it (its shortfall and the levers
    re-sized), or None: no memory lever of the appliance's to re-size, or the nodes do
    not agree to restart (``retry_agreed``)."""
    levers, precision, plan = sizing.options.levers, sizing.options.precision, sizing.plan
    if memory_retry(levers, request, precision, plan, heads, 0.0) is None:
        return None
    shortfall = retry_agreed(topology, outcome, logs_dir)
    if shortfall is None:
        return None
    retry = memory_retry(levers, request, precision, plan, heads, shortfall)
    taken_back = [
        f"{name} {getattr(levers, name)!r} -> {getattr(retry, name)!r}"
        for name in MEMORY_LEVERS
        if getattr(levers, name) != getattr(retry, name)
    ]
    return retry, {"shortfall_mib": round(shortfall, 1), "taken_back": taken_back}


def set_aside_first_attempt(folder: RunFolder) -> Path:
    """The failed attempt's config, XTuner work dir and training logs, moved under
    attempt-1/ (the collective check's logs stay); the retry writes where they were."""
    aside = folder.first_attempt
    (aside / folder.logs.relative_to(folder.path)).mkdir(parents=True, exist_ok=True)
    moved = [folder.config, folder.xtuner, *(p for p in folder.logs.iterdir() if p != folder.collective_logs)]
    for path in moved:
        try:
            path.rename(aside / path.relative_to(folder.path))
        except FileNotFoundError:  # another node on a shared filesystem moved it
            pass
    return aside
