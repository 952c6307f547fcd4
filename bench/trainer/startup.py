"""When each part of the trainer's start-up ended (bench/verdict/startup.py names them).

The dataset and the model note their own end; StartupHook notes the runner's (it is
built with the runner), DeepSpeed's (before_run) and the first step's, and rank 0
writes all of them into the work dir at each of its events, so a start-up that fails
still shows how far it got.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from mmengine.hooks import Hook

from bench.core.trainer_files import STARTUP_EVENTS_NAME

_ENDED: dict[str, float] = {}


def note(event: str) -> None:
    """The first time ``event`` happened in this process (wall clock)."""
    _ENDED.setdefault(event, time.time())


class StartupHook(Hook):
    priority = "VERY_HIGH"

    def __init__(self):
        note("runner_built")

    def before_run(self, runner) -> None:
        note("training_ready")
        self._write(runner)

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if "first_step_done" not in _ENDED:
            note("first_step_done")
            self._write(runner)

    @staticmethod
    def _write(runner) -> None:
        if runner.rank == 0:
            (Path(runner.work_dir) / STARTUP_EVENTS_NAME).write_text(json.dumps(_ENDED))
