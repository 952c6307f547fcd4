"""The fault suite: what a hostile tester does to the appliance, case by case.

Every case ends with the right exit code and a one-line reason that names the path or
variable, never a traceback, and data/ and model/ unchanged. The cases live in tables
by the kind of input they break:

- layouts, read by plain `validate` (missing images, image paths that leave the images
  folder): `tests/cli/test_validate.py` BREAKAGES; by `validate --deep`:
  `tests/cli/test_bad_inputs.py` DEEP_CASES;
- arguments and environments that `run` refuses before training (a one-record dataset,
  an unwritable results folder, a `--junit` nobody can write, bad scheduler
  variables, a dataset JSON with a byte-order mark, a seed numpy refuses, a missing
  evaluation image, a master port whose store port is out of range): `tests/cli/test_bad_inputs.py`
  RUN_CASES and the `--junit` cases; results inside data/ or model/, also through a
  huggingface_hub cache's links, and under a dangling link: the cases after them;
- a hub endpoint without a scheme: `tests/entrypoint/tools/test_prepare.py`; synth over files it did not
  write: `tests/cli/test_end_to_end.py`;
- a metrics stream edited after the run, and steps a run trained but never logged:
  `tests/cli/test_end_to_end.py`, `tests/bench/verdict/test_verdict.py`;
- scheduler readings (`--world-size-means processes` with NPROC_PER_NODE, SLURM with a
  contradicting WORLD_SIZE, ModelArts' MA_NUM_GPUS, nothing set): `tests/entrypoint/job/test_topology.py`;
- the GPU inventory under CUDA_VISIBLE_DEVICES: `tests/entrypoint/preflight/test_environment.py`;
- signals before and during training (SIGINT, SIGTERM, SIGHUP, and kill -9 of the appliance, which the
  trainer must not outlive): `tests/cli/test_end_to_end.py`, `tests/entrypoint/launch/test_supervision.py`;
- a node that waits for an absent node 0: `tests/entrypoint/job/test_agreement.py`;
- here: the machine itself (a results filesystem full at the start or filling during
  training, on a real tmpfs), a machine without a Docker engine running the container
  tests, and the options every command shares.

Mounting needs root; where it is not allowed the disk tests say so in one line and do
not run, unless LLAVA_BENCH_REQUIRE_CONTAINER_TESTS=1 (`.ci/run`), which makes that a
failure.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cli.test_end_to_end import DEMO_ARGS
from tests.conftest import ENDLESS_STEPS, REPO, cli_argv, run_argv


@contextlib.contextmanager
def tmpfs(folder: Path, size: str):
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True, text=True
    )
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
    """Take every free byte of the filesystem. A running trainer writes meanwhile, so
    what was free a moment ago may not be: take what is free until nothing is."""
    with open(folder / "filler", "wb") as stream:
        taken = 0
        for _ in range(100):
            free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
            if free == 0:
                return
            try:
                os.posix_fallocate(stream.fileno(), taken, free)
                taken += free
            except OSError as error:
                if error.errno != errno.ENOSPC:
                    raise  # else written by the run in between: measure again
    raise AssertionError(f"{folder} still has free space after 100 tries")


def test_a_full_results_filesystem_at_the_start_is_one_line_and_exit_3(synthetic_layout, tmp_path):
    with tmpfs(tmp_path / "full", "1m") as full:
        fill(full)
        done = subprocess.run(
            [
                *run_argv(synthetic_layout, full / "results"),
                *DEMO_ARGS,
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert done.returncode == 3, done.stdout + done.stderr
    assert "the results could not be written" in done.stderr and "No space left on device" in done.stderr
    assert "Traceback" not in done.stdout + done.stderr


def test_a_filesystem_that_fills_during_training_ends_the_run_as_disk_full(endless_layout, tmp_path):
    """Past the 2 GB free-space check, the disk fills while the trainer runs: the run
    stops within a minute as disk full, naming the file, and nothing is left running."""
    with tmpfs(tmp_path / "small", "2200m") as small:
        process = subprocess.Popen(
            [
                *run_argv(endless_layout, small / "results"),
                *DEMO_ARGS[:-6],
                "--max-steps",
                str(ENDLESS_STEPS),
                "--target-loss",
                "1e-9",
                "--per-device-batch",
                "8",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
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


@pytest.mark.parametrize("required", [False, True])
def test_the_container_tests_without_an_engine_say_why_in_one_line(required, tmp_path):
    """`make test` on a machine without Docker: one line saying why the container tests
    did not run; where they are required (CI), the same line as a failure."""
    env = {key: value for key, value in os.environ.items() if key != "LLAVA_BENCH_REQUIRE_CONTAINER_TESTS"}
    env["DOCKER_HOST"] = "unix:///nonexistent/docker.sock"
    if required:
        env["LLAVA_BENCH_REQUIRE_CONTAINER_TESTS"] = "1"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-rs",
            "-m",
            "container",
            "-p",
            "no:cacheprovider",
            f"--basetemp={tmp_path}",
            str(REPO / "tests" / "container" / "test_container.py"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    output = done.stdout + done.stderr
    assert done.returncode == (1 if required else 0), output
    assert "container tests not run:" in output and "Traceback" not in output
    assert len(output.splitlines()) < 40, output  # not pages of traceback
    # It names what is missing here, and writes no synthetic layout for tests that do not run.
    can_build = os.geteuid() == 0 and shutil.which("debootstrap") is not None
    missing = "no Docker engine answers at unix:///nonexistent/docker.sock" if can_build else "this machine lacks"
    assert missing in output, output
    assert not list(tmp_path.glob("**/data")), "a layout was written before the skip"


@pytest.mark.parametrize(
    "command", ["prepare", "validate", "run", "perf", "verdict", "topology", "check-cluster", "demo"]
)
def test_every_command_shows_its_flags_as_flags_and_one_default_root(command):
    """A flag's help shows no <bool> (it takes no value), and every command that reads a
    layout defaults to the same root, /llava (demo and perf write their own)."""
    done = subprocess.run(
        cli_argv(command, "--help"),
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert done.returncode == 0, done.stderr
    flags = [line for line in done.stdout.splitlines() if "<bool>" in line and "--help" not in line]
    assert flags == []
    root = [line for line in done.stdout.splitlines() if "--root" in line]
    if command in ("prepare", "validate", "run", "check-cluster"):
        assert root and "[default: /llava]" in root[0], root


@pytest.mark.parametrize("filled", [True, False])
def test_a_trainer_that_dies_of_a_full_disk_names_the_results_folder_only_if_it_is_full(tmp_path, filled):
    """The trainer may hit the full disk before the appliance's own log writes do: its
    ENOSPC crash reads "disk full at" the results folder when that filesystem is full,
    and names the failure with a hint when the full one is elsewhere."""
    from entrypoint.launch.plans import LaunchPlan
    from entrypoint.launch.supervise import supervise

    with tmpfs(tmp_path / "results", "100m") as results:  # above DISK_FULL_BYTES free unless filled
        if filled:
            fill(results)
        script = "import sys; sys.stderr.write('OSError: [Errno 28] No space left on device\\n'); sys.exit(1)"
        plan = LaunchPlan(
            [sys.executable, "-c", script], dict(os.environ), tmp_path, tmp_path / "logs", distributed=False
        )
        outcome = supervise(plan, results, on_record=lambda record: None)
    detail = outcome.termination.detail
    assert outcome.termination.kind == "crashed"
    assert detail.startswith(f"disk full at {results}: trainer exit code 1") == filled, detail
    assert "a filesystem the trainer writes is full; hint: free space on it" in detail
