"""The trainer started beside the checks (entrypoint/launch/early_start.py): real
processes of bench.trainer.gate on CPU. A run's opened gate, and the stop of a run that
preflight refuses, are asserted in tests/cli/test_end_to_end.py."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from bench.core.layout import Layout
from bench.core.run_folder import RunFolder
from entrypoint.job.topology import Topology
from entrypoint.launch.early_start import EarlyTrainer

ONE_PROCESS = Topology(1, 0, 1, "127.0.0.1", 29500, "test")


def _no_process_holds(path: Path) -> bool:
    found = subprocess.run(["pgrep", "-f", f"bench.trainer.gate {path}"], capture_output=True, text=True)
    return found.stdout == ""


def test_an_attempt_launched_otherwise_stops_the_early_trainer(tmp_path):
    """A plan that would launch the trainer with another environment (say, TF32 on
    where it was started with it off) is not handed to it: it is told to stop at its
    gate and ends, and the attempt launches afresh."""
    (tmp_path / "layout").mkdir()
    folder = RunFolder(tmp_path / "run")
    early = EarlyTrainer.start(folder, Layout.at(tmp_path / "layout"), "cpu", ONE_PROCESS, float32=False)
    with early:
        assert early.started.process.poll() is None
        otherwise = replace(early.plan, env={**early.plan.env, "NVIDIA_TF32_OVERRIDE": "0"})
        assert early.open(otherwise) is None
    assert early.started.process.returncode == 0 and early.opened_at is None
    assert "stop" in json.loads(folder.trainer_gate.read_text())
    log = (folder.logs / "rank0.stdout.log").read_text()
    assert "stopped at its gate before training: the attempt launches the trainer otherwise" in log
    assert _no_process_holds(folder.trainer_gate)


def test_a_trainer_whose_launcher_is_gone_stops_at_its_gate(tmp_path):
    """Its launcher killed outright (the appliance, or torchrun): no word will come, and
    the trainer does not wait for one forever."""
    gate, log = tmp_path / "trainer-gate.json", tmp_path / "gate.log"
    launcher = f"{sys.executable} -m bench.trainer.gate {gate} > {log} 2>&1 & sleep 2"
    subprocess.run(["sh", "-c", launcher], check=True, cwd=Path(__file__).resolve().parents[3])
    deadline = time.monotonic() + 60
    while "stopped at its gate" not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline, log.read_text() if log.exists() else "no log"
        time.sleep(0.2)
    assert "the process that launched the trainer is gone" in log.read_text()
    while not _no_process_holds(gate):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert not gate.exists()  # it only reads the gate


def test_under_torchrun_each_rank_waits_and_stops_at_the_gate(tmp_path):
    """On GPUs the early trainer is torchrun's: its rank runs the gate as a module
    (``-m``), and a stop ends the rank and torchrun cleanly (CPU here: no rank touches a GPU
    before its gate opens)."""
    (tmp_path / "layout").mkdir()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    topology = Topology(1, 0, 1, "127.0.0.1", port, "test")
    folder = RunFolder(tmp_path / "run")
    early = EarlyTrainer.start(folder, Layout.at(tmp_path / "layout"), "cuda", topology, float32=False)
    assert early.plan.distributed and early.plan.argv[-len(early.plan.program) :][:2] == ["-m", "bench.trainer.gate"]
    with early:
        deadline = time.monotonic() + 60
        while not list(folder.logs.glob("ranks/*/attempt_0/0/stdout.log")):  # the rank runs
            assert time.monotonic() < deadline and early.started.process.poll() is None
            time.sleep(0.2)
    assert early.started.process.returncode == 0
    (rank_log,) = folder.logs.glob("ranks/*/attempt_0/0/stdout.log")
    assert "stopped at its gate before training: the run ended before training" in rank_log.read_text()
    assert _no_process_holds(folder.trainer_gate)


def test_the_gated_launch_is_the_attempts_launch_on_gpus_too(tmp_path):
    """What ``open`` compares: for the GPU launch (torchrun, and the float32 reference's
    TF32 off, set at the launch) the gated plan and the attempt's plan agree, so an early
    trainer is not started in vain; they differ only in the program."""
    from entrypoint.launch.plans import gated_plan, training_plan, write_float32_deepspeed_config

    for float32 in (False, True):
        gated = gated_plan(tmp_path / "gate.json", tmp_path / "logs", tmp_path, "cuda", ONE_PROCESS, float32)
        deepspeed = write_float32_deepspeed_config(tmp_path) if float32 else "deepspeed_zero2"
        attempt = training_plan(
            tmp_path / "config.py", tmp_path / "xtuner", tmp_path / "logs", tmp_path, "cuda", ONE_PROCESS, [], deepspeed
        )
        assert (gated.launcher, gated.env, gated.cwd, gated.logs_dir) == (
            attempt.launcher,
            attempt.env,
            attempt.cwd,
            attempt.logs_dir,
        )
        assert ("NVIDIA_TF32_OVERRIDE" in attempt.env) is float32
        assert gated.program[:2] == ("-m", "bench.trainer.gate") and attempt.program[1] == str(tmp_path / "config.py")
