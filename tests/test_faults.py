"""Faults of the machine itself, made real: a results filesystem that is full at the
start or fills during training (a small tmpfs). Mounting needs root; where it is not
allowed these tests say so in one line and do not run, unless
LLAVA_BENCH_REQUIRE_CONTAINER_TESTS=1 (`.ci/run`), which makes that a failure.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_end_to_end import DEMO_ARGS


@contextlib.contextmanager
def tmpfs(folder: Path, size: str):
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True, text=True)
    if mounted.returncode != 0:
        message = f"fault tests not run: mounting a tmpfs is not allowed here ({mounted.stderr.strip()})"
        if os.environ.get("LLAVA_BENCH_REQUIRE_CONTAINER_TESTS") == "1":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder: Path) -> None:
    """Take every free byte of the filesystem."""
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    with open(folder / "filler", "wb") as stream:
        os.posix_fallocate(stream.fileno(), 0, free)


def test_a_full_results_filesystem_at_the_start_is_one_line_and_exit_3(synthetic_layout, tmp_path):
    with tmpfs(tmp_path / "full", "1m") as full:
        fill(full)
        done = subprocess.run(
            [sys.executable, "-m", "entrypoint", "run", "--root", str(synthetic_layout), "--out", str(full / "results"), *DEMO_ARGS],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    assert done.returncode == 3, done.stdout + done.stderr
    assert "the results could not be written" in done.stderr and "No space left on device" in done.stderr
    assert "Traceback" not in done.stdout + done.stderr


def test_a_filesystem_that_fills_during_training_ends_the_run_as_disk_full(synthetic_layout, tmp_path):
    """Past the 2 GB free-space check, the disk fills while the trainer runs: the run
    stops within a minute as disk full, naming the file, and nothing is left running."""
    with tmpfs(tmp_path / "small", "2200m") as small:
        process = subprocess.Popen(
            [sys.executable, "-m", "entrypoint", "run", "--root", str(synthetic_layout), "--out", str(small / "results"),
             *DEMO_ARGS[:-6], "--max-steps", "100000", "--target-loss", "1e-9", "--per-device-batch", "8"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 180
        for line in process.stdout:  # training runs
            if "step " in line and "loss" in line:
                break
            assert time.monotonic() < deadline, "no training step within 180 s"
        fill(small)
        filled = time.monotonic()
        stdout, stderr = process.communicate(timeout=120)
        stopped_in = time.monotonic() - filled
    assert process.returncode == 3, stdout + stderr
    assert stopped_in < 60
    assert "disk full at" in stdout and "Traceback" not in stdout + stderr
    assert subprocess.run(["pgrep", "-f", str(small)], capture_output=True, text=True).stdout == ""
