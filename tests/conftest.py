"""Shared fixtures: one synthetic layout per test session, copied where a test changes it."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from bench.synth.spec import DEMO_PER_DEVICE_BATCH, DEMO_SAMPLES, SynthSpec
from bench.synth.writer import write_synthetic_layout

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data"

# transformers copies a model folder's own code (trust_remote_code) into one cache per
# user, named after the folder: every layout's internlm2-chat-20b lands in the same
# place, and a test that edits that code (tests/entrypoint/launch/test_memory_fallback.py) would reach a
# test session running beside this one, or the user's own runs. This session's copies,
# and those of every process it starts, go to a folder of its own.
HF_MODULES = tempfile.TemporaryDirectory(prefix="llava-bench-tests-hf-modules-")
os.environ["HF_MODULES_CACHE"] = HF_MODULES.name


@pytest.fixture(scope="session")
def synthetic_layout(tmp_path_factory) -> Path:
    """A pristine layout; tests must not change it (use ``layout_copy``)."""
    root = tmp_path_factory.mktemp("pristine") / "llava"
    write_synthetic_layout(root, SynthSpec(samples=DEMO_SAMPLES))
    return root


# For runs a test stops while they train: the epoch (and so --max-steps, which may not
# pass the LR schedule's end) is this many steps at the demo's per-device batch.
ENDLESS_STEPS = 3_000


@pytest.fixture(scope="session")
def endless_layout(tmp_path_factory) -> Path:
    """The synthetic layout with records enough for ENDLESS_STEPS steps an epoch (the
    images reused in turn); tests must not change it (use ``endless_copy``)."""
    root = tmp_path_factory.mktemp("endless") / "llava"
    write_synthetic_layout(root, SynthSpec(samples=DEMO_SAMPLES, records=ENDLESS_STEPS * DEMO_PER_DEVICE_BATCH))
    return root


@pytest.fixture
def endless_copy(endless_layout, tmp_path) -> Path:
    root = tmp_path / "llava"
    shutil.copytree(endless_layout, root)
    return root


@pytest.fixture
def layout_copy(synthetic_layout, tmp_path) -> Path:
    root = tmp_path / "llava"
    shutil.copytree(synthetic_layout, root)
    return root


def tree_digest(root: Path, *parts: str) -> str:
    """One hash over every file's path and bytes under root/<part>, to prove nothing changed."""
    digest = hashlib.sha256()
    for part in parts:
        for path in sorted((root / part).rglob("*")):
            if path.is_file():
                digest.update(str(path.relative_to(root)).encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()


def torchrun_gloo(script: Path, processes: int, *args: str) -> subprocess.CompletedProcess:
    """``script`` as ``processes`` real gloo ranks of one torchrun on this machine."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            str(processes),
            str(script),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "GLOO_SOCKET_IFNAME": "lo"},
    )


# A run or perf on this machine's CPU at the demo's per-device batch.
CPU = ("--device", "cpu", "--per-device-batch", str(DEMO_PER_DEVICE_BATCH))


def cli_argv(*args: str) -> list[str]:
    """The real CLI's command line, as a user would run it."""
    return [sys.executable, "-m", "entrypoint", *args]


def run_argv(root, out, *args: str) -> list[str]:
    """`llava-bench run` on the layout ``root`` with its results in ``out``."""
    return cli_argv("run", "--root", str(root), "--out", str(out), *args)


def llava_bench(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """The real CLI in a child process, as a user would run it."""
    return subprocess.run(cli_argv(*args), capture_output=True, text=True, **kwargs)


def spawn_run(layout: Path, out: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    """`llava-bench run` on the layout ``layout`` with its results in ``out``, to its end."""
    return subprocess.run(run_argv(layout, out, *args), capture_output=True, text=True, **kwargs)


def training_run(layout: Path, out: Path) -> subprocess.Popen:
    """`llava-bench run` on CPU for far more steps than a test waits (the endless layout's
    epoch), returned once it really trains."""
    process = subprocess.Popen(
        [*run_argv(layout, out), *CPU, "--max-steps", str(ENDLESS_STEPS)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 180
    for line in process.stdout:
        if "step " in line and "loss" in line:
            break
        assert time.monotonic() < deadline, "no training step within 180 s"
    return process


def short_cpu_run(layout: Path, out: Path, *options: str) -> subprocess.CompletedProcess:
    """A real 20-step CPU run of the demo's batch, its verdict on stdout."""
    return spawn_run(
        layout,
        out,
        *CPU,
        "--max-steps",
        "20",
        "--target-loss",
        "1.6",
        "--json",
        *options,
    )
