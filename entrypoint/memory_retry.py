"""The out-of-memory retry's two decisions: whether every node restarts, and where the
failed attempt's files go (docs/PERFORMANCE.md, "When the memory model is wrong")."""

from __future__ import annotations

from pathlib import Path

from entrypoint.agreement import exchange
from entrypoint.diagnose import OUT_OF_MEMORY, logs_report
from entrypoint.topology import Topology


def retry_agreed(topology: Topology, outcome, logs_dir: Path) -> bool:
    """Whether every node restarts: all crashed, one ran out of GPU memory, and node 0
    (the node that reads the metrics) saw no step logged. The nodes exchange what they saw."""
    seen = {
        "crashed": outcome.termination.kind == "crashed",
        "out_of_memory": logs_report(logs_dir, OUT_OF_MEMORY),
        "stepped": outcome.first_record_at is not None,
    }
    answers = exchange(topology, "memory-retry", seen)
    if answers is None:
        return False
    return all(a["crashed"] for a in answers) and any(a["out_of_memory"] for a in answers) and not answers[0]["stepped"]


def set_aside_first_attempt(run_dir: Path, node_rank: int) -> Path:
    """The failed attempt's config, XTuner work dir and training logs, moved under
    attempt-1/ (the collective check's logs stay); the retry writes where they were."""
    aside = run_dir / "attempt-1"
    logs = run_dir / "logs" / f"node-{node_rank}"
    (aside / "logs" / logs.name).mkdir(parents=True, exist_ok=True)
    for path in [run_dir / "config.py", run_dir / "xtuner", *(p for p in logs.iterdir() if p.name != "collective")]:
        try:
            path.rename(aside / path.relative_to(run_dir))
        except FileNotFoundError:  # another node on a shared filesystem moved it
            pass
    return aside
