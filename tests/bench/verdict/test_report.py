"""report.md on a verdict recorded on the H200 (tests/data/h200_tiny_run: the tiny
synthetic layout, `run --device cuda --per-device-batch 8 --global-batch 8 --max-steps
60 --target-loss 0.4`, 1 x NVIDIA H200, 2026-12-03): the document people sign says what
ran, on what."""

from __future__ import annotations

import json
import shutil

from bench.verdict import document as verdict_mod
from bench.verdict.report import markdown, write_report
from tests.conftest import DATA, llava_bench

RECORDED = DATA / "h200_tiny_run"


def test_the_recorded_gpu_verdict_recomputes_byte_for_byte(tmp_path):
    run_dir = shutil.copytree(RECORDED, tmp_path / "run")
    stored = json.loads((run_dir / "verdict.json").read_text())
    verdict_mod.validate(stored)
    assert verdict_mod.dumps(verdict_mod.recompute(run_dir)) == (run_dir / "verdict.json").read_text()


def test_the_report_of_a_gpu_run_says_what_ran_on_what():
    verdict = json.loads((RECORDED / "verdict.json").read_text())
    report = markdown(verdict, None)
    section = report.split("## What ran, on what\n\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert [line.split("**")[1] for line in section] == [
        "hardware",
        "software",
        "topology",
        "interconnect",
        "stragglers",
        "recipe",
        "memory retry",
        "inputs",
        "speed ratio against",
    ]
    assert "- **hardware**: 1 x NVIDIA H200 (143,771 MiB), driver 580.159.04, on 1 node(s)" in section
    assert "torch 2.11.0, xtuner 0.2.0, deepspeed 0.16.9" in report and "CUDA 13.0" in report and "NCCL" in report
    assert "- **stragglers**: one rank: none to compare" in section
    assert f"sha256 {verdict['inputs']['dataset_sha256']}" in report  # the whole hash: the reader checks it
    assert "not computed, the models are not InternLM2-20B" in report
    assert "not recorded" not in report
    # One clock: the times to the target and to max_steps count from the appliance's launch.
    timing = verdict["timing"]
    to_target = timing["preflight_seconds"] + timing["time_to_target_seconds"]
    assert f"| launch to the target, s / to 60 steps, projected at the mean s/step | {to_target:.1f} / " in report


def test_a_single_process_gpu_run_says_there_was_no_interconnect_to_check():
    """One GPU process has no peer: the appliance runs no collective check
    (entrypoint/job/cluster.py), and the verdict's null interconnect says why."""
    from entrypoint.job.cluster import needs_collective_check
    from entrypoint.job.topology import Topology

    single, pair = (Topology(1, 0, processes, "127.0.0.1", 29500, "test") for processes in (1, 2))
    assert (needs_collective_check("cuda", single), needs_collective_check("cuda", pair)) == (False, True)
    assert needs_collective_check("cpu", pair) is False
    verdict = json.loads((RECORDED / "verdict.json").read_text())
    assert verdict["topology"]["world_size"] == 1
    verdict["interconnect"] = None
    assert "- **interconnect**: one process: no interconnect to check" in markdown(verdict, None)


def test_report_redraws_and_says_which_files_it_wrote(tmp_path):
    run_dir = shutil.copytree(RECORDED, tmp_path / "run")
    done = llava_bench("report", str(run_dir))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"written: {run_dir / 'report.md'} and {run_dir / 'loss.png'}"
    assert (run_dir / "report.md").read_text() == markdown(json.loads((run_dir / "verdict.json").read_text()), None)


def test_write_report_draws_no_plot_without_a_curve(tmp_path):
    verdict = json.loads((RECORDED / "verdict.json").read_text())
    verdict["result"]["curve"] = []
    path, not_plotted = write_report(tmp_path, verdict)
    assert not_plotted == "no loss was logged" and not (tmp_path / "loss.png").exists() and path.is_file()
