"""XTuner's train.py, started before its config exists.

On one node the appliance starts the trainer while its checks still run
(entrypoint/launch/early_start.py): each process here imports what train.py, the
config and DeepSpeed will import (the modules named on the command line), which is
most of a trainer's start, and then waits at the gate file. The appliance writes there
either train.py's arguments, and this process runs train.py's main with them, exactly
as ``python train.py ARGS`` would, or a stop, and it exits before any GPU work. A
launcher that went away without a word ends it too.

Usage: python -m bench.trainer.gate GATE_JSON [MODULE ...]
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import threading
import time
from pathlib import Path

from bench.core.trainer_files import IMPORTS_DONE_EVENT

POLL_SECONDS = 0.05


def read_gate(gate: Path) -> dict | None:
    """The appliance's word (written whole, by rename), or None while there is none."""
    try:
        return json.loads(gate.read_text())
    except FileNotFoundError:
        return None


def wait_at_gate(gate: Path, launcher_pid: int) -> dict:
    """{"argv": [...]} to train, or {"stop": why}."""
    while True:
        word = read_gate(gate)
        if word is not None:
            return word
        if os.getppid() != launcher_pid:
            return {"stop": "the process that launched the trainer is gone"}
        time.sleep(POLL_SECONDS)


def _stop_when_told(gate: Path, launcher_pid: int) -> None:
    """Beside the imports: a stop ends the process at once, not after them."""
    word = wait_at_gate(gate, launcher_pid)
    if "argv" not in word:
        print(f"llava-bench: the trainer stopped at its gate before training: {word.get('stop')}", flush=True)
        os._exit(0)


def main(gate: Path, modules: list[str]) -> None:
    watcher = threading.Thread(target=_stop_when_told, args=(gate, os.getppid()), daemon=True)
    watcher.start()
    train = importlib.import_module("xtuner.tools.train")
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception:  # noqa: BLE001 - the trainer meets the same failure where it needs the module, and reports it there
            pass
    from bench.trainer.startup import note

    note(IMPORTS_DONE_EVENT)
    watcher.join()  # returns only once the gate holds train.py's arguments
    sys.argv = [train.__file__, *read_gate(gate)["argv"]]
    train.main()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
