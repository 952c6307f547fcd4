"""The appliance writes only inside its results folder: read-only data/ and model/
mounts work, and two runs started together never collide."""

from __future__ import annotations

import json
import subprocess
from contextlib import contextmanager

from bench.synth.spec import DEMO_CRITERIA
from bench.verdict import document as verdict_mod
from tests.conftest import CPU, cli_argv, tree_digest


@contextmanager
def read_only(*folders):
    """Real read-only bind mounts (as a container's `-v ...:ro` gives), removed afterwards."""
    mounted = []
    try:
        for folder in folders:
            subprocess.run(["mount", "--bind", str(folder), str(folder)], check=True)
            mounted.append(folder)
            subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], check=True)
        yield
    finally:
        for folder in reversed(mounted):
            subprocess.run(["umount", str(folder)], check=True)


def test_two_concurrent_runs_on_read_only_data_and_models(layout_copy):
    before = tree_digest(layout_copy, "data", "model")
    top_level = {p.name for p in layout_copy.iterdir()}
    arguments = [
        "--root",
        str(layout_copy),
        *CPU,
        "--max-steps",
        "20",
        "--target-loss",
        str(DEMO_CRITERIA.target_loss + 1),
    ]
    with read_only(layout_copy / "data", layout_copy / "model"):
        probe = subprocess.run(["touch", str(layout_copy / "data" / "probe")], capture_output=True)
        assert probe.returncode != 0  # the mount really is read-only
        runs = [
            subprocess.Popen(
                cli_argv("run", *arguments),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        outputs = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    run_dirs = sorted((layout_copy / "results").iterdir())
    assert len(run_dirs) == 2 and run_dirs[0].name != run_dirs[1].name
    for run_dir in run_dirs:
        verdict = json.loads((run_dir / "verdict.json").read_text())
        verdict_mod.validate(verdict)
        assert verdict["run_id"] == run_dir.name
        assert verdict["termination"]["kind"] == "completed"
    assert tree_digest(layout_copy, "data", "model") == before
    assert {p.name for p in layout_copy.iterdir()} == top_level | {"results"}  # nothing else appeared
