"""SIGINT and SIGTERM as the appliance handles them: before training they abort the run
(with a verdict), during training they stop the trainer and the verdict of what ran is
still written."""

from __future__ import annotations

import signal
import sys


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived before training: the run ends as aborted. A BaseException,
    so that no ``except Exception`` on the way swallows it."""

    def __init__(self, number: int):
        super().__init__(number)
        self.signal_name = signal.Signals(number).name


class SignalFlag:
    """Turns SIGINT/SIGTERM into a flag (``received``) inside the block, the previous
    handlers after: the supervision loop stops the trainer on it; after training, the
    verdict of what ran is still written."""

    def __init__(self):
        self._previous = {}
        self.received: int | None = None

    def __enter__(self):
        for number in (signal.SIGINT, signal.SIGTERM):
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
