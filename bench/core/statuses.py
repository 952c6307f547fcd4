"""The words every stage speaks about a run's end: its statuses and their exit codes,
how the trainer ended, what the run is judged by, and the watchdog's limits. Fixed
vocabularies: a third party can rely on these words."""

from __future__ import annotations

import math
from dataclasses import dataclass

STATUSES = ("pass", "fail", "invalid", "error", "aborted")
EXIT_CODES = {"pass": 0, "fail": 1, "invalid": 2, "error": 3, "aborted": 3}
TERMINATIONS = (
    "completed",  # the trainer ran all its iterations and exited 0
    "stopped_on_target",  # the appliance stopped it at the first crossing (--stop-on-target)
    "stopped_nonfinite_loss",  # the appliance stopped it at a NaN/inf loss (the verdict is fail)
    "crashed",  # the trainer exited non-zero
    "stalled",  # the watchdog stopped it
    "aborted",  # a signal from outside stopped it
    "unknown",  # only a metrics stream is known (``verdict`` on a bare stream)
)


@dataclass(frozen=True)
class Criteria:
    target_loss: float = 2.3
    max_steps: int = 500
    stop_on_target: bool = False

    def __post_init__(self):
        if not (math.isfinite(self.target_loss) and self.target_loss > 0):
            raise ValueError(f"the target loss must be a finite number above 0, not {self.target_loss!r}")
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, not {self.max_steps!r}")


@dataclass(frozen=True)
class Watchdog:
    """A run that shows no progress is stopped rather than left to hold the cluster."""

    startup_seconds: float = 3600.0  # launch to the first metrics record
    stall_seconds: float = 1800.0  # between metrics records once training runs


@dataclass(frozen=True)
class Termination:
    """How the training process ended, as the launcher saw it."""

    kind: str = "unknown"
    detail: str = ""

    def __post_init__(self):
        if self.kind not in TERMINATIONS:
            raise ValueError(f"termination must be one of {TERMINATIONS}, not {self.kind!r}")
