"""The idle gaps of a profiled step (bench/verdict/idle_gaps.py), on a small trace written
here in the shape torch.profiler's Chrome trace has (kernels, runtime launches linked by
correlation ids, CPU ops nested on their thread)."""

from __future__ import annotations

import gzip
import json

import pytest


def _event(category: str, name: str, start: float, duration: float, thread: int = 1, correlation=None) -> dict:
    event = {"ph": "X", "cat": category, "name": name, "ts": start, "dur": duration, "tid": thread, "args": {}}
    if correlation is not None:
        event["args"]["correlation"] = correlation
    return event


TRACE = [
    _event("user_annotation", "ProfilerStep#7", 0, 3000),
    _event("cpu_op", "autograd::engine::evaluate_function: MmBackward0", 100, 400),
    _event("user_annotation", "llava_bench.recompute", 110, 380),
    _event("cpu_op", "aten::sin", 150, 20),  # ended before the launch below: not enclosing it
    _event("cpu_op", "aten::cos", 200, 20),
    _event("cuda_runtime", "cudaLaunchKernel", 205, 5, correlation=2),
    _event("cuda_runtime", "cudaStreamSynchronize", 120, 20),
    _event("cuda_driver", "cuLaunchKernel", 2390, 5, thread=2, correlation=4),  # Triton's launch
    _event("kernel", "nvjet_gemm", 0, 100, thread=7, correlation=1),
    _event("kernel", "cos_kernel", 300, 50, thread=7, correlation=2),  # 200 us after the gemm
    _event("kernel", "add_kernel", 353, 10, thread=7, correlation=3),  # 3 us: a launch, not a wait
    _event("kernel", "late_kernel", 2400, 10, thread=7, correlation=4),  # 2,037 us, launched outside any op
    _event("kernel", "orphan_kernel", 2430, 10, thread=7, correlation=9),  # 20 us, its launch not traced
]


def test_each_gap_is_charged_to_the_ops_that_launched_the_kernel_after_it():
    from bench.verdict.idle_gaps import idle_gaps

    gaps = idle_gaps(TRACE)
    assert gaps["gap_seconds"] == pytest.approx((200 + 2037 + 20) / 1e6)
    assert gaps["by_length_seconds"] == pytest.approx(
        {"under 50 us": 20e-6, "50 us to 1 ms": 200e-6, "1 ms and over": 2037e-6}
    )
    charged = {charge["ops"]: charge["seconds"] for charge in gaps["by_launching_ops"]}
    assert charged == pytest.approx(
        {
            "ProfilerStep#7 > autograd::engine::evaluate_function: MmBackward0 > ... > aten::cos": 200e-6,
            "(no op)": 2037e-6,
            "(launch not in the trace)": 20e-6,
        }
    )
    assert [charge["ops"] for charge in gaps["by_launching_ops"]][0] == "(no op)"  # the largest first
    assert gaps["synchronizations"] == 1


def test_perf_reads_the_trace_beside_the_profile_and_prints_where_the_gpu_waited(tmp_path):
    from dataclasses import replace

    from bench.core.trainer_files import PROFILE_NAME, PROFILE_TRACE_NAME
    from bench.verdict.perf_compare import _profile, profile_table
    from tests.conftest import DATA
    from tests.entrypoint.tools.test_perf import _row

    folder = tmp_path / "run" / "xtuner"
    folder.mkdir(parents=True)
    (folder / PROFILE_NAME).write_text((DATA / "h200_profile" / "profile.json").read_text())
    assert "idle_gaps" not in _profile({"_run_dir": str(tmp_path / "run")})  # no trace kept: none
    with gzip.open(folder / PROFILE_TRACE_NAME, "wt") as trace:
        json.dump({"traceEvents": TRACE}, trace)
    profile = _profile({"_run_dir": str(tmp_path / "run")})
    assert profile["idle_gaps"]["synchronizations"] == 1
    text = profile_table([replace(_row("default", None), profile=profile)])
    assert "default idle: 0.00 s between kernels, 1 synchronizations" in text
    assert "(no op) (0.002 s)" in text
