"""A child process of preflight that answers with one JSON line.

Work that imports the LLM folder's code or runs for seconds goes to a child: it runs
beside the checks, a crash or a hang in it cannot take the appliance along, and it is
never left running (a context manager that kills it on the way out).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from entrypoint.launch.plans import offline_environment
from entrypoint.launch.signals import dies_with_this_process


class JsonChild:
    """``python -m MODULE ARGS``, whose last line of standard output is its answer."""

    def __init__(self, module: str, *args: str):
        self._child = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env=offline_environment(),
            start_new_session=True,  # its own group: stopping it stops what it started too
            preexec_fn=dies_with_this_process(),
        )

    @property
    def pid(self) -> int:
        return self._child.pid

    def running(self) -> bool:
        return self._child.poll() is None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self._child.poll() is None:
            try:
                os.killpg(self._child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._child.communicate()

    def answer(self, timeout: float) -> dict:
        """The child's answer; ``{"error": why}`` when it has none within ``timeout`` s."""
        try:
            stdout, stderr = self._child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            return {"error": f"it took over {timeout:.0f} s"}
        try:
            return json.loads(stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            last = (stderr.strip().splitlines() or ["no output"])[-1]
            return {"error": f"its child process failed (exit {self._child.returncode}): {last}"}


def answer_main(work, *args) -> None:
    """A child's main: ``work(*args)``'s answer, or the first line of why it failed."""
    try:
        answer = work(*args)
    except Exception as error:  # noqa: BLE001 - any failure is the answer
        answer = {"error": f"{type(error).__name__}: {error}".splitlines()[0]}
    print(json.dumps(answer), flush=True)
