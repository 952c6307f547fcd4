"""Start XTuner's trainer and supervise it until it ends.

The trainer runs in its own process group so that one signal reaches torchrun and
every rank; its output goes to files under ``logs/`` (XTuner's own log omits
tracebacks). ``xtuner train`` is not used: it returns 0 even when the trainer crashed.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from bench.core.statuses import Termination, Watchdog
from bench.verdict.metrics import MetricsRecord, find_stream, parse_line
from entrypoint.launch.diagnose import DISK_FULL, diagnose, last_lines, logs_report
from entrypoint.launch.plans import LaunchPlan
from entrypoint.launch.signals import SignalFlag, dies_with_this_process

GRACE_SECONDS = 30  # between SIGTERM and SIGKILL of the trainer's process group
LOG_CAP_BYTES = 200 * 2**20  # per captured stream; a runaway rank cannot fill the disk
LOG_TAIL_BYTES = 2**20  # kept from the end of a stream that went over the cap
DISK_FULL_BYTES = 64 * 2**20  # less free than this where the results are: that disk is the full one


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def process_age_seconds() -> float | None:
    """Seconds since this process started, from Linux's /proc, so that start-up counts
    the interpreter, the imports and preflight too; None where /proc is missing."""
    try:
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        # Field 22 of stat, counted after the parenthesised command name (which may hold spaces).
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None
    return round(max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK")), 3)


def seconds_since_age(age: float | None) -> float | None:
    """Seconds since the process was ``age`` seconds old (None without /proc)."""
    now = process_age_seconds()
    return None if now is None or age is None else round(now - age, 3)


@dataclass
class Outcome:
    exit_code: int | None
    termination: Termination
    first_record_at: str | None
    first_record_seconds: float | None  # from launch to the first metrics record
    ended_at: str
    last_iteration: int = 0  # the last logged iteration (0: none)


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


def _stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to the whole group (and SIGCONT, in case it was stopped), SIGKILL after the grace period."""
    for sig, wait in ((signal.SIGTERM, GRACE_SECONDS), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
            os.killpg(process.pid, signal.SIGCONT)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


class CappedLog(threading.Thread):
    """Copies a pipe to a file up to a cap; past it, keeps only the last LOG_TAIL_BYTES
    and says how much was dropped. Should the file stop taking writes (a full disk), it
    records why in ``failed`` and drains the pipe on, so the writer never blocks."""

    def __init__(self, pipe, path: Path, cap: int = LOG_CAP_BYTES):
        super().__init__(daemon=True)
        self.pipe, self.path, self.cap = pipe, path, cap
        self.failed: OSError | None = None

    def run(self) -> None:
        try:
            self._copy()
        except OSError as error:
            self.failed = error
            for _ in iter(lambda: self.pipe.read1(1 << 16), b""):
                pass

    def _copy(self) -> None:
        written = dropped = 0
        tail = bytearray()
        with open(self.path, "wb") as sink:
            for chunk in iter(lambda: self.pipe.read1(1 << 16), b""):
                room = max(self.cap - written, 0)
                sink.write(chunk[:room])
                written += min(room, len(chunk))
                if len(chunk) > room:
                    tail += chunk[room:]
                    dropped += max(len(tail) - LOG_TAIL_BYTES, 0)
                    del tail[: max(len(tail) - LOG_TAIL_BYTES, 0)]
                sink.flush()
            if tail or dropped:
                note = f"log capped at {self.cap} bytes; {dropped} bytes dropped; the last {len(tail)} follow"
                sink.write(f"\n[llava-bench: {note}]\n".encode())
                sink.write(bytes(tail))

    def failure(self) -> str | None:
        """Why the log could not be written, in words, or None."""
        if self.failed is None:
            return None
        what = (
            "disk full"
            if self.failed.errno == errno.ENOSPC
            else f"cannot write ({self.failed.strerror or self.failed})"
        )
        return f"{what} at {self.path}"


def disk_full_at(folder: Path) -> str | None:
    """ "disk full at FOLDER" when the filesystem holding it has (next to) no space left:
    a trainer that died of ENOSPC ran out there, not on some other filesystem."""
    try:
        stats = os.statvfs(folder)
    except OSError:
        return None
    return f"disk full at {folder}" if stats.f_bavail * stats.f_frsize < DISK_FULL_BYTES else None


@dataclass
class Started:
    """A launched plan: its process group, and the threads copying its output into the logs."""

    process: subprocess.Popen
    pumps: list[CappedLog]


def start(plan: LaunchPlan) -> Started:
    """Launch the plan in its own process group, its output pumped into ``plan.logs_dir``."""
    plan.logs_dir.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        plan.argv,
        cwd=plan.cwd,
        env=plan.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if plan.distributed else subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=dies_with_this_process(),
    )
    pumps = [CappedLog(process.stdout, plan.logs_dir / ("launcher.log" if plan.distributed else "rank0.stdout.log"))]
    if not plan.distributed:
        pumps.append(CappedLog(process.stderr, plan.logs_dir / "rank0.stderr.log"))
    for pump in pumps:
        pump.start()
    return Started(process, pumps)


def stop(started: Started, wait_seconds: float = 0.0) -> int:
    """The group's exit code, once it has ended: given ``wait_seconds`` to end by itself,
    then stopped (SIGTERM, SIGKILL after the grace period); its logs written out."""
    try:
        started.process.wait(timeout=wait_seconds)
    except subprocess.TimeoutExpired:
        _stop_group(started.process)
    exit_code = started.process.wait()
    for pump in started.pumps:
        pump.join()
    return exit_code


def supervise(
    plan: LaunchPlan,
    work_dir: Path,
    on_record: Callable[[MetricsRecord], Termination | None],
    watchdog: Watchdog = Watchdog(),
    poll_seconds: float = 1.0,
    out_of_memory_hint: Callable[[int], str] | None = None,
    started: Started | None = None,
) -> Outcome:
    """Run the plan to its end (``started``: already launched, as an early trainer is).
    ``on_record`` sees each new record; a Termination it returns stops the run with that
    termination (target reached, non-finite loss). A crash's reason carries
    ``out_of_memory_hint(the last logged iteration)`` when the GPUs ran out of memory."""
    tail = _StreamTail(work_dir)
    first_record_at = first_record_seconds = None
    stop_with: Termination | None = None
    started = started or start(plan)
    process, pumps = started.process, started.pumps
    launched = last_progress = time.monotonic()
    last_step = 0
    with SignalFlag() as signals:
        try:
            while stop_with is None:
                exited = process.poll() is not None
                for record in tail.new_records():
                    last_progress, last_step = time.monotonic(), record.iter
                    if first_record_at is None:
                        first_record_at, first_record_seconds = utc_now(), round(last_progress - launched, 3)
                    stop_with = stop_with or on_record(record)
                if exited or stop_with:
                    break
                if signals.received is not None:
                    name = signal.Signals(signals.received).name
                    stop_with = Termination("aborted", f"{name} received; the trainer's process group was stopped")
                    break
                failure = next((pump.failure() for pump in pumps if pump.failure()), None)
                if failure:
                    stop_with = Termination(
                        "crashed", f"{failure}; the trainer was stopped (what was written so far is kept)"
                    )
                    break
                silent = time.monotonic() - last_progress
                if first_record_at is None and silent > watchdog.startup_seconds:
                    stop_with = Termination(
                        "stalled", f"no training step within {watchdog.startup_seconds:.0f} s of launch"
                    )
                elif first_record_at is not None and silent > watchdog.stall_seconds:
                    stop_with = Termination(
                        "stalled", f"no new metrics for {watchdog.stall_seconds:.0f} s after iteration {last_step}"
                    )
                if stop_with is None:
                    time.sleep(poll_seconds)
        finally:
            exit_code = stop(started)
    if stop_with is not None and stop_with.kind == "stalled":
        lines = last_lines(plan.logs_dir)
        stop_with = Termination("stalled", stop_with.detail + (f"; last lines: {lines}" if lines else ""))
    if stop_with is not None:
        termination = stop_with
    elif exit_code == 0:
        termination = Termination("completed")
    else:
        cause = diagnose(plan.logs_dir, out_of_memory_hint(last_step) if out_of_memory_hint else None)
        full = disk_full_at(work_dir) if logs_report(plan.logs_dir, DISK_FULL) else None
        termination = Termination(
            "crashed",
            (f"{full}: " if full else "") + f"trainer exit code {exit_code}" + (f"; {cause}" if cause else ""),
        )
    return Outcome(exit_code, termination, first_record_at, first_record_seconds, utc_now(), last_step)


def run_to_end(plan: LaunchPlan, timeout_seconds: float) -> int | None:
    """Run a short job (the collective check) to its end; None if it outlived the timeout."""
    started = start(plan)
    try:
        started.process.wait(timeout=timeout_seconds)
    except subprocess.TimeoutExpired:
        return None
    finally:
        exit_code = stop(started)  # after a timeout or a signal (Interrupted): no orphaned process group
    return exit_code
