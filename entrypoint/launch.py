"""Start XTuner's trainer and supervise it until it ends.

The trainer runs in its own process group so that one signal reaches torchrun and
every rank; its output goes to files under ``logs/`` (XTuner's own log omits
tracebacks). ``xtuner train`` is not used: it drops the exit code (FACTS.md).
"""
from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from bench.criteria import Termination
from bench.metrics import MetricsRecord, find_stream, parse_line
from entrypoint.topology import Topology

GRACE_SECONDS = 30  # between SIGTERM and SIGKILL of the trainer's process group
# The last line of a Python traceback: "pkg.module.SomeError: message".
ERROR_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)(:.*)?$")


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def xtuner_train_script() -> Path:
    """XTuner's ``tools/train.py`` in the running Python's environment."""
    spec = importlib.util.find_spec("xtuner")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"XTuner is not installed for {sys.executable}")
    return Path(next(iter(spec.submodule_search_locations))) / "tools" / "train.py"


@dataclass(frozen=True)
class LaunchPlan:
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    logs_dir: Path
    distributed: bool  # torchrun with one process per GPU; else one plain process (CPU)


def _environment() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        # The layout holds every file; nothing is ever fetched at run time.
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }


def torchrun_plan(topology: Topology, program: list[str], logs_dir: Path, cwd: Path) -> LaunchPlan:
    """torchrun with the topology's explicit arguments; each rank's output in its own files."""
    argv = [
        sys.executable, "-m", "torch.distributed.run",
        *topology.torchrun_args(),
        "--log-dir", str(logs_dir / "ranks"),
        "--redirects", "3",
        "--tee", "3",
        *program,
    ]  # fmt: skip
    return LaunchPlan(argv, _environment(), cwd, logs_dir, distributed=True)


def training_plan(
    config: Path,
    work_dir: Path,
    logs_dir: Path,
    cwd: Path,
    device: str,
    topology: Topology,
    cfg_options: list[str] = (),
) -> LaunchPlan:
    """The exact training command: torchrun + DeepSpeed ZeRO-2 on GPUs, one plain process on CPU.

    ``cwd`` is the layout root, as in the seed's procedure, so a user's config with
    relative paths (``./data/...``) resolves them there.
    """
    train_args = [str(xtuner_train_script()), str(config), "--work-dir", str(work_dir)]
    if cfg_options:
        train_args += ["--cfg-options", *cfg_options]
    if device == "cpu":
        argv = [sys.executable, *train_args, "--launcher", "none"]
        return LaunchPlan(argv, _environment(), cwd, logs_dir, distributed=False)
    program = [*train_args, "--deepspeed", "deepspeed_zero2", "--launcher", "pytorch"]
    return torchrun_plan(topology, program, logs_dir, cwd)


@dataclass
class Outcome:
    exit_code: int | None
    termination: Termination
    first_record_at: str | None
    first_record_seconds: float | None  # from launch to the first metrics record
    ended_at: str


@dataclass
class _StreamTail:
    """Reads complete new lines of the metrics stream as XTuner appends them."""

    work_dir: Path
    path: Path | None = None
    offset: int = 0
    partial: str = ""

    def new_records(self) -> list[MetricsRecord]:
        if self.path is None:
            self.path = find_stream(self.work_dir)
            if self.path is None:
                return []
        with self.path.open() as stream:
            stream.seek(self.offset)
            chunk = stream.read()
            self.offset = stream.tell()
        lines = (self.partial + chunk).split("\n")
        self.partial = lines.pop()
        return [record for record in map(parse_line, lines) if record is not None]


def last_error_line(logs_dir: Path) -> str:
    """The last exception line any rank wrote, to name the cause of a crash."""
    found = ""
    for log in sorted(logs_dir.rglob("*.log")):
        for line in log.read_text(errors="replace").splitlines():
            if ERROR_LINE.match(line):
                found = f"{line.strip()} ({log.relative_to(logs_dir)})"
    return found


class _Signals:
    """Turns SIGINT/SIGTERM into a flag the supervision loop acts on."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self):
        for number in (signal.SIGINT, signal.SIGTERM):
            self._previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, number, _frame):
        self.received = number

    def __exit__(self, *exc):
        for number, handler in self._previous.items():
            signal.signal(number, handler)


def _stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to the whole group, SIGKILL after the grace period."""
    for sig, wait in ((signal.SIGTERM, GRACE_SECONDS), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def supervise(
    plan: LaunchPlan,
    work_dir: Path,
    on_record: Callable[[MetricsRecord], bool],
    poll_seconds: float = 1.0,
) -> Outcome:
    """Run the plan to its end. ``on_record`` sees each new record; True stops the run (target reached)."""
    plan.logs_dir.mkdir(parents=True, exist_ok=True)
    tail = _StreamTail(work_dir)
    first_record_at = first_record_seconds = None
    stopped_on_target = False
    with ExitStack() as stack, _Signals() as signals:
        if plan.distributed:
            stdout = stack.enter_context(open(plan.logs_dir / "launcher.log", "wb"))
            stderr = subprocess.STDOUT
        else:
            stdout = stack.enter_context(open(plan.logs_dir / "rank0.stdout.log", "wb"))
            stderr = stack.enter_context(open(plan.logs_dir / "rank0.stderr.log", "wb"))
        process = subprocess.Popen(
            plan.argv, cwd=plan.cwd, env=plan.env, stdout=stdout, stderr=stderr,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        launched = time.monotonic()
        try:
            while True:
                exited = process.poll() is not None
                for record in tail.new_records():
                    if first_record_at is None:
                        first_record_at, first_record_seconds = utc_now(), round(time.monotonic() - launched, 3)
                    if not stopped_on_target and on_record(record):
                        stopped_on_target = True
                        _stop_group(process)
                if exited or stopped_on_target:
                    break
                if signals.received is not None:
                    _stop_group(process)
                    break
                time.sleep(poll_seconds)
        finally:
            if process.poll() is None:
                _stop_group(process)
        exit_code = process.wait()
    if signals.received is not None and not stopped_on_target:
        name = signal.Signals(signals.received).name
        termination = Termination("aborted", f"{name} received; the trainer's process group was stopped")
    elif stopped_on_target:
        termination = Termination("stopped_on_target", "ended by the appliance at the first crossing")
    elif exit_code == 0:
        termination = Termination("completed")
    else:
        cause = last_error_line(plan.logs_dir)
        termination = Termination(
            "crashed", f"trainer exit code {exit_code}" + (f"; {cause}" if cause else "")
        )
    return Outcome(exit_code, termination, first_record_at, first_record_seconds, utc_now())


def run_to_end(plan: LaunchPlan, timeout_seconds: float) -> int | None:
    """Run a short job (the collective check) to its end; None if it outlived the timeout."""
    plan.logs_dir.mkdir(parents=True, exist_ok=True)
    with open(plan.logs_dir / "launcher.log", "wb") as log:
        process = subprocess.Popen(
            plan.argv, cwd=plan.cwd, env=plan.env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        try:
            return process.wait(timeout=timeout_seconds)
        except subprocess.TimeoutExpired:
            _stop_group(process)
            return None
