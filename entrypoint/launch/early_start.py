"""The trainer started while preflight still checks, held at a gate until it is told.

Most of a trainer's start is its interpreter and imports (torch, XTuner, DeepSpeed,
transformers), none of which depends on what the checks decide. On one node with no
collective check before training, preflight starts the trainer (bench/trainer/gate.py)
as soon as the cheap checks passed and the run's folder is known; it imports while the
deep checks, the model code's probe and the tokenization run. The first attempt then
opens the gate with train.py's arguments, and the run's clock counts the trainer's
launch from there. A check that fails, or any other end before training, stops it at
the gate, before any GPU work: nothing it did can change what the checks decided.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from bench.core.layout import Layout
from bench.core.run_folder import RunFolder
from entrypoint.job.cluster import needs_collective_check
from entrypoint.job.topology import Topology
from entrypoint.launch.plans import LaunchPlan, gated_plan
from entrypoint.launch.supervise import Started, start, stop

STOP_WAIT_SECONDS = 10  # for a trainer told to stop to end by itself, before its group is stopped


def starts_early(device: str, topology: Topology, layout: Layout) -> bool:
    """One node, no collective check on the way (it would launch on the trainer's port),
    and the layout's root there to run in."""
    return topology.nnodes == 1 and not needs_collective_check(device, topology) and layout.root.is_dir()


def _say(gate: Path, word: dict) -> None:
    """Written whole: the trainer never reads half of it."""
    partial = gate.with_name(gate.name + ".partial")
    partial.write_text(json.dumps(word) + "\n")
    os.replace(partial, gate)


def _launch(plan: LaunchPlan) -> tuple:
    """How a plan launches its program: what must match for an early trainer to take it."""
    return plan.launcher, plan.env, plan.cwd, plan.logs_dir, plan.distributed


@dataclass
class EarlyTrainer:
    """A context manager: leaving it before the gate opened stops the trainer."""

    plan: LaunchPlan
    gate: Path
    started: Started
    started_at: float  # epoch seconds
    opened_at: float | None = None  # epoch seconds, once the first attempt took it

    @classmethod
    def start(cls, folder: RunFolder, layout: Layout, device: str, topology: Topology, float32: bool) -> EarlyTrainer:
        gate = folder.trainer_gate
        plan = gated_plan(gate, folder.logs, layout.root, device, topology, float32)
        return cls(plan, gate, start(plan), time.time())

    def open(self, plan: LaunchPlan) -> Started | None:
        """The launched trainer, handed ``plan``'s program; None (and stopped) when
        ``plan`` would launch it otherwise than it was (the attempt launches afresh)."""
        if _launch(plan) != _launch(self.plan) or self.started.process.poll() is not None:
            self.close("the attempt launches the trainer otherwise than it was started")
            return None
        _say(self.gate, {"argv": list(plan.program[1:])})
        self.opened_at = time.time()
        return self.started

    def close(self, why: str) -> None:
        """Stop it at the gate (nothing, once it was opened: the attempt's supervisor owns it)."""
        if self.opened_at is not None:
            return
        if self.started.process.poll() is None:
            _say(self.gate, {"stop": why})
        stop(self.started, STOP_WAIT_SECONDS)

    def as_dict(self, imports_done_at: float | None) -> dict:
        """The verdict's timing.startup.early_start: how long before its launch the
        trainer was started, and how long its imports took (null: not noted)."""
        return {
            "lead_seconds": round(self.opened_at - self.started_at, 3),
            "imports_seconds": None if imports_done_at is None else round(imports_done_at - self.started_at, 3),
        }

    def __enter__(self) -> EarlyTrainer:
        return self

    def __exit__(self, *exc) -> None:
        self.close("the run ended before training")
