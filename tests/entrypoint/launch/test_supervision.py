"""Supervision of a real run: watchdog, non-finite loss, capped logs, failure diagnosis.

The runs are real XTuner runs on CPU. The diagnosis cases read log files written
the way torchrun and PyTorch write them (tests/data/logs): out-of-memory and NCCL
timeouts cannot happen on this machine, so their text is recorded, not produced.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.verdict import document as verdict_mod
from entrypoint.launch.diagnose import diagnose
from tests.conftest import CPU, DATA, spawn_run, training_run


def verdict_of(out: Path) -> dict:
    (path,) = out.glob("*/verdict.json")
    verdict = json.loads(path.read_text())
    verdict_mod.validate(verdict)
    return verdict


def test_no_first_step_within_the_startup_budget_is_a_stall(synthetic_layout, tmp_path):
    done = spawn_run(
        synthetic_layout,
        tmp_path,
        *CPU,
        "--max-steps",
        "20",
        "--startup-timeout",
        "3",
    )
    assert done.returncode == 3
    verdict = verdict_of(tmp_path)
    assert (verdict["status"], verdict["termination"]["kind"]) == ("error", "stalled")
    assert "no training step within 3 s of launch" in verdict["reason"]
    assert "last lines: rank0.std" in verdict["reason"]


def test_a_frozen_trainer_is_stopped_by_the_stall_watchdog(endless_layout, tmp_path):
    process = training_run(endless_layout, tmp_path)
    process.send_signal(signal.SIGINT)
    process.wait(timeout=60)
    assert process.returncode == 3
    assert "SIGINT" in verdict_of(tmp_path)["termination"]["detail"]


def test_process_age_counts_from_the_process_start_not_from_the_call():
    """preflight_seconds starts at the process's start (/proc), so the imports count."""
    script = (
        "import time; time.sleep(0.5)\n"
        "from entrypoint.launch.supervise import process_age_seconds\n"
        "print(process_age_seconds())"
    )
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    wall = time.monotonic() - started
    assert 0.5 <= float(done.stdout) <= wall + 0.02  # /proc counts in 10 ms ticks


def test_a_crash_reason_keeps_the_root_cause_of_a_chained_error(tmp_path):
    """What transformers prints when an optional import fails: a wrapper whose message
    ends in ':' and continues below, raised from the real cause. Both are in the reason."""
    program = (
        "try:\n    import triton.no_such_module\n"
        "except ImportError as error:\n"
        "    raise RuntimeError('Failed to import transformers.integrations.bitsandbytes because of the following "
        "error (look up to see its traceback):\\n' + str(error)) from error\n"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True)
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "rank0.stderr.log").write_text(done.stderr)
    reason = diagnose(logs)
    assert "RuntimeError: Failed to import transformers.integrations.bitsandbytes" in reason
    assert "No module named 'triton" in reason.split("caused by")[0]  # the continued message
    assert "caused by ModuleNotFoundError: No module named 'triton" in reason


def test_a_signal_swallowed_on_the_way_is_raised_at_the_next_stage_without_a_traceback():
    """Before training a signal raises wherever the appliance is, even inside code that
    swallows exceptions (here a fork handler, as logging's is): it is kept and raised by
    the next stage's check, and the swallowed one prints nothing. In a child process:
    the fork handler cannot be unregistered."""
    script = (
        "import os, signal\n"
        "from entrypoint.launch.signals import AbortOnSignals, Interrupted\n"
        "with AbortOnSignals() as before_training:\n"
        "    os.register_at_fork(after_in_parent=lambda: os.kill(os.getpid(), signal.SIGTERM) or sum(range(10**6)))\n"
        "    child = os.fork()\n"
        "    if child == 0:\n"
        "        os._exit(0)\n"
        "    os.waitpid(child, 0)\n"
        "    print('went on')\n"
        "    try:\n"
        "        before_training.check()\n"
        "    except Interrupted as stop:\n"
        "        print('raised', stop.signal_name)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.stdout.split("\n")[:2] == ["went on", "raised SIGTERM"], done
    assert done.stderr == ""


def test_progress_under_accumulation_says_where_in_the_step_each_logged_loss_is():
    """At global batch 1024 on one GPU a step is 32 micro-batches and logs several
    losses: each line names its micro-batch, so repeated step numbers do not read as a
    restart."""
    import io

    from rich.console import Console

    from bench.verdict.metrics import MetricsRecord
    from entrypoint.launch.progress import ProgressPrinter

    out = io.StringIO()
    printer = ProgressPrinter(Console(file=out, width=200), max_steps=10, accumulative_counts=32)
    for iteration in (10, 20, 30, 40):
        printer(MetricsRecord(iter=iteration, loss=12.0, time=5.0))
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("  step     1/10 (micro-batch 10/320) | loss 12.0000 | 160.000 s/step")
    assert "step     2/10 (micro-batch 40/320)" in lines[3]


def test_a_rank_out_of_memory_on_the_h200_is_named_from_the_ranks_own_lines():
    """Logs of a real 1 x H200 run that ran out of memory (tails kept): torchrun prefixes
    the rank's lines with "[rank0]: " and ends with its ChildFailedError wrapper; the
    reason names the rank's own error, not the wrapper's rule of "=" signs."""
    reason = diagnose(DATA / "logs" / "oom-h200")
    assert reason.startswith("rank 0 (local rank 0) failed first; out of GPU memory; hint:")
    assert "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.08 GiB" in reason
    assert "ChildFailedError" not in reason and "====" not in reason


def test_the_runs_clock_leaves_out_what_the_command_did_before_the_run():
    """demo writes its layout before the run: those seconds are not the run's imports."""
    from bench.core.statuses import Criteria
    from bench.recipe.render import RecipeOptions
    from entrypoint.launch.supervise import process_age_seconds
    from entrypoint.request import RunRequest, run_age_seconds

    request = RunRequest(Path("/llava"), None, Criteria(), RecipeOptions(), setup_seconds=3600.0)
    assert run_age_seconds(request) == 0.0  # this process is younger than the hour left out
    clocked = run_age_seconds(RunRequest(Path("/llava"), None, Criteria(), RecipeOptions(), setup_seconds=0.5))
    age = process_age_seconds()
    assert age - 0.6 <= clocked <= age - 0.49
