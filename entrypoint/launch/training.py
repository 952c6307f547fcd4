"""One training attempt: its config and command written into the run's folder, the
trainer supervised to its end, and what the attempt's timing and start-up were."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from bench.core.layout import Layout
from bench.core.run_folder import RunFolder
from bench.core.statuses import Criteria, Termination
from bench.core.trainer_files import IMPORTS_DONE_EVENT, STARTUP_EVENTS_NAME
from bench.recipe.render import PINNED_LOG_INTERVAL, RecipeOptions, RenderedRecipe
from bench.verdict.metrics import MetricsRecord, is_finite
from bench.verdict.startup import trainer_startup
from entrypoint.job.topology import Topology
from entrypoint.launch.early_start import EarlyTrainer
from entrypoint.launch.plans import DEEPSPEED_CONFIG, LaunchPlan, training_plan, write_float32_deepspeed_config
from entrypoint.launch.progress import ProgressPrinter
from entrypoint.launch.sizing import Sizing, out_of_memory_hint_at
from entrypoint.launch.supervise import Outcome, supervise, utc_now
from entrypoint.request import RunRequest


def write_attempt(
    recipe: RenderedRecipe, folder: RunFolder, layout: Layout, device: str, topology: Topology
) -> LaunchPlan:
    """config.py of this attempt and the command that trains it."""
    folder.config.write_text(recipe.text)
    deepspeed = write_float32_deepspeed_config(folder.path) if recipe.float32 else DEEPSPEED_CONFIG
    return training_plan(
        folder.config, folder.xtuner, folder.logs, layout.root, device, topology, recipe.cfg_options, deepspeed
    )


def train_attempt(
    plan: LaunchPlan,
    folder: RunFolder,
    request: RunRequest,
    options: RecipeOptions,
    console: Console,
    sizing: Sizing,
    heads: int,
    early_trainer: EarlyTrainer | None = None,
) -> tuple[Outcome, dict]:
    """One training attempt to its end: its outcome, and when it started, how long it
    took and how it ended (the verdict's timing.attempts; ``launched``: epoch seconds,
    when the trainer was launched or, started early, its gate opened)."""
    trainer = early_trainer.open(plan) if early_trainer is not None else None
    started_at, launched, started = utc_now(), time.time(), time.monotonic()
    printer = ProgressPrinter(console, options.max_steps, options.accumulative_counts)
    outcome = supervise(
        plan,
        folder.xtuner,
        _stop_check(request.criteria, printer),
        request.watchdog,
        out_of_memory_hint=out_of_memory_hint_at(sizing, heads, min(PINNED_LOG_INTERVAL, options.max_iters)),
        started=trainer,
    )
    if outcome.termination.kind not in ("completed", "stopped_on_target"):
        # said here too: should the verdict not be writable (a full disk), the console has it
        console.print(f"[yellow]training {outcome.termination.kind}[/]: {outcome.termination.detail}", highlight=False)
    return outcome, {
        "started_at": started_at,
        "ended_at": outcome.ended_at,
        "wall_seconds": round(time.monotonic() - started, 3),
        "termination": outcome.termination.kind,
        "detail": outcome.termination.detail,
        "launched": launched,
    }


def startup_events(work_dir: Path) -> dict[str, float]:
    """Rank 0's start-up notes (none when it never built its runner)."""
    try:
        return json.loads((work_dir / STARTUP_EVENTS_NAME).read_text())
    except (OSError, ValueError):
        return {}


def attempt_trainer_startup(work_dir: Path, launched_at: float) -> dict | None:
    """The trainer's start-up parts from rank 0's notes (none when it noted none)."""
    events = startup_events(work_dir)
    return trainer_startup(events, launched_at) if events else None


def early_start_record(early_trainer: EarlyTrainer | None, work_dir: Path) -> dict | None:
    """timing.startup.early_start of the attempt that just ended (null: not started early)."""
    if early_trainer is None or early_trainer.opened_at is None:
        return None
    return early_trainer.as_dict(startup_events(work_dir).get(IMPORTS_DONE_EVENT))


def _stop_check(criteria: Criteria, printer: ProgressPrinter):
    """Print each record; stop at a non-finite loss (the verdict is fail) or, if asked, at the target."""

    def on_record(record: MetricsRecord) -> Termination | None:
        printer(record)
        if not is_finite(record.loss):
            return Termination("stopped_nonfinite_loss", f"loss {record.loss} at iteration {record.iter}")
        if criteria.stop_on_target and record.loss < criteria.target_loss:
            return Termination("stopped_on_target", "ended by the appliance at the first crossing")
        return None

    return on_record


def timing_section(
    preflight_seconds: float | None,
    attempts: Sequence[dict] = (),
    outcome: Outcome | None = None,
    startup: dict | None = None,
) -> dict:
    """The verdict's timing: every attempt's time (``attempts``, as train_attempt gives
    them; the last one's ``outcome``) and the start-up's parts; with no attempt, a run
    that ended before anything was launched."""
    now, last = utc_now(), (attempts[-1] if attempts else None)
    section = {"preflight_seconds": preflight_seconds}
    if last is not None:
        section["earlier_attempts_seconds"] = round(last["launched"] - attempts[0]["launched"], 3)
        section["attempts"] = [{k: v for k, v in a.items() if k != "launched"} for a in attempts]
    section |= {
        "started_at": last["started_at"] if last else now,
        "first_record_at": outcome.first_record_at if outcome else None,
        "first_record_seconds": outcome.first_record_seconds if outcome else None,
        "ended_at": outcome.ended_at if outcome else now,
        "wall_seconds": last["wall_seconds"] if last else 0.0,
    }
    if last is not None:
        section["startup"] = startup
    return section
