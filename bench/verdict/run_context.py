"""What the verdict depends on besides the metrics stream: its own module, so that the
verdict and the sections it is built from both import it (neither imports the other)."""

from __future__ import annotations

from dataclasses import dataclass, field

from bench.core.statuses import Criteria, Termination


@dataclass(frozen=True)
class RunContext:
    """Everything besides the metrics stream that the verdict depends on."""

    run_id: str
    criteria: Criteria
    termination: Termination
    accumulative_counts: int = 1
    per_device_batch: int | None = None
    world_size: int | None = None
    trainer_exit_code: int | None = None
    demo: bool = False
    recipe: dict | None = None
    topology: dict | None = None
    timing: dict | None = None
    interconnect: dict | None = None  # the collective check before training (GPUs only)
    environment: dict | None = None  # software and per-node GPU inventory
    inputs: dict | None = None  # dataset and model identities, model shapes
    rank_times: list[dict] | None = None  # each rank's forward time (bench/verdict/ranks.py)
    problems: list[dict] = field(default_factory=list)  # preflight refusals: status invalid
