"""SIGINT, SIGTERM and SIGHUP as the appliance handles them: before training they abort
the run (with a verdict), during training they stop the trainer and the verdict of what
ran is still written. What it launches dies with it, even when it is killed outright."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable

# A closed terminal or ssh session sends SIGHUP; a scheduler's stop, SIGTERM.
HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class Interrupted(BaseException):
    """A handled signal arrived before training: the run ends as aborted. A BaseException,
    so that no ``except Exception`` on the way swallows it."""

    def __init__(self, number: int):
        super().__init__(number)
        self.signal_name = signal.Signals(number).name


class SignalFlag:
    """Turns the handled signals into a flag (``received``) inside the block, the previous
    handlers after: the supervision loop stops the trainer on it; after training, the
    verdict of what ran is still written."""

    def __init__(self):
        self._previous = {}
        self.received: int | None = None

    def __enter__(self):
        for number in HANDLED:
            self._previous[number] = signal.signal(number, self.handle)
        return self

    def handle(self, number, _frame):
        self.received = number

    def __exit__(self, *exc):
        for number, handler in self._previous.items():
            signal.signal(number, handler)


class AbortOnSignals(SignalFlag):
    """Before training: a signal raises Interrupted wherever the appliance is (preflight,
    agreeing with the other nodes, the collective check); their children are stopped on
    the way out. Code that swallows exceptions (a fork handler, a finalizer) can swallow
    that one too: the signal is also kept, and ``check`` raises it at the next stage."""

    def __enter__(self):
        self._unraisable_hook, sys.unraisablehook = sys.unraisablehook, self._quiet_if_interrupted
        return super().__enter__()

    def __exit__(self, *exc):
        sys.unraisablehook = self._unraisable_hook
        super().__exit__(*exc)

    def _quiet_if_interrupted(self, unraisable) -> None:
        """A swallowed Interrupted prints no traceback: ``check`` raises it again."""
        if not isinstance(unraisable.exc_value, Interrupted):
            self._unraisable_hook(unraisable)

    def handle(self, number, _frame):
        super().handle(number, _frame)
        raise Interrupted(number)

    def check(self) -> None:
        if self.received is not None:
            raise Interrupted(self.received)


def dies_with_this_process() -> Callable[[], None]:
    """A ``preexec_fn`` for what the appliance launches: the child gets SIGTERM when the
    appliance dies, however it dies (kill -9 after a scheduler's grace time included),
    so no trainer is left holding the GPUs with nobody to judge or stop it (Linux's
    PR_SET_PDEATHSIG; torchrun passes the SIGTERM on to its ranks)."""
    parent = os.getpid()

    def set_in_child() -> None:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the appliance died before the request took effect
            os._exit(1)

    return set_in_child
