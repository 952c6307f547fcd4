"""Where every file of a run goes: one folder a run (``<results>/<run_id>/``), which the
nodes of a job share on a shared filesystem; each node writes its own logs there."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

METRICS_NAME = "metrics.jsonl"


@dataclass(frozen=True)
class RunFolder:
    path: Path
    node_rank: int = 0

    @property
    def config(self) -> Path:
        """The config XTuner runs (this attempt's)."""
        return self.path / "config.py"

    @property
    def xtuner(self) -> Path:
        """XTuner's work dir: its metrics stream, the trainer's start-up notes, rank timings."""
        return self.path / "xtuner"

    @property
    def logs(self) -> Path:
        """This node's process logs."""
        return self.path / "logs" / f"node-{self.node_rank}"

    @property
    def trainer_gate(self) -> Path:
        """What the appliance told a trainer started early: train.py's arguments, or a stop."""
        return self.logs / "trainer-gate.json"

    @property
    def collective_logs(self) -> Path:
        return self.logs / "collective"

    @property
    def metrics(self) -> Path:
        """Node 0's copy of the metrics stream, which the verdict is recomputed from."""
        return self.path / METRICS_NAME

    @property
    def first_attempt(self) -> Path:
        """Where a failed first attempt's files are set aside before the retry."""
        return self.path / "attempt-1"

    @property
    def node_document(self) -> Path:
        """A node other than 0: what it saw, beside node 0's verdict."""
        return self.path / f"node-{self.node_rank}.json"
