"""The parts of a run's start-up, for the verdict's ``timing.startup`` (docs/VERDICT.md).

Inside the trainer, rank 0 notes when each part ended (bench/trainer/startup.py) in
STARTUP_EVENTS_NAME in XTuner's work dir, as wall-clock times; the appliance turns them
into seconds from the trainer's launch and seconds per part.
"""

from __future__ import annotations

# The trainer's start-up in order, each part named by the event that ends it.
TRAINER_PARTS = (
    ("runner_seconds", "runner_built"),  # torchrun, imports, the config, the process group, the runner
    ("dataset_seconds", "dataset_built"),  # the tokenized dataset read, or XTuner's tokenization
    ("model_seconds", "model_built"),  # the weights loaded (and dequantized)
    ("deepspeed_seconds", "training_ready"),  # the engine, the optimizer, the other hooks' before_run
    ("first_step_seconds", "first_step_done"),  # the first iteration, its warm-up included
)
STARTUP_EVENTS = tuple(event for _, event in TRAINER_PARTS)


def trainer_startup(events: dict[str, float], launched_at: float) -> dict:
    """Seconds from the launch to each recorded event, and of each part whose two ends
    were recorded (null otherwise: a stock run's XTuner dataset and model note nothing)."""
    since_launch = {event: round(events[event] - launched_at, 3) for event in STARTUP_EVENTS if event in events}
    parts, previous = {}, 0.0
    for part, event in TRAINER_PARTS:
        end = since_launch.get(event)
        parts[part] = None if end is None or previous is None else round(end - previous, 3)
        previous = end
    return {**parts, "events_since_launch": since_launch}
