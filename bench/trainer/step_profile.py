"""`run --profile`: where a steady step's GPU time goes, by kind of work.

torch.profiler records rank 0's CUDA kernels over PROFILED_ITERATIONS; each kernel is
put in one kind by its name (KERNEL_KINDS, first match), and the kernels launched while
a checkpointed layer is recomputed in the backward pass (RECOMPUTE_RANGE, named by
bench/trainer/levered_llava.py) are summed besides. The steps' wall time less the
kernels' is the GPU's idle time: launch gaps, host work, the data wait.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import torch
from mmengine.hooks import Hook

from bench.core.trainer_files import PROFILE_NAME, PROFILE_TRACE_NAME, PROFILED_ITERATIONS

RECOMPUTE_RANGE = "llava_bench.recompute"

# Kind -> a pattern of the kernel names that do it, matched in this order.
KERNEL_KINDS = {
    "communication": r"nccl",
    "attention": r"flash|fmha|attention|attn",
    "matmul": r"gemm|nvjet|cutlass|xmma|cublas|splitk|sm\d+_",
    "NF4 dequantize": r"dequantize|kDequant",
    "optimizer": r"adam|multi_tensor|foreach",
    "copies": r"^Memcpy|^Memset|copy_kernel|CatArrayBatched|cat_",
    "elementwise and reductions": r".",
}


def kind_of(kernel: str) -> str:
    return next(kind for kind, pattern in KERNEL_KINDS.items() if re.search(pattern, kernel, re.IGNORECASE))


class StepProfileHook(Hook):
    """Profiles PROFILED_ITERATIONS on rank 0 and writes PROFILE_NAME (and a Chrome trace) to the work dir."""

    priority = "LOWEST"

    def __init__(self):
        self._profiler = None
        self._started = 0.0

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        if runner.rank == 0 and runner.iter == PROFILED_ITERATIONS[0] and torch.cuda.is_available():
            from torch.profiler import ProfilerActivity, profile

            torch.cuda.synchronize()
            self._profiler = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            self._profiler.__enter__()
            self._started = time.perf_counter()

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if self._profiler is None or runner.iter != PROFILED_ITERATIONS[-1]:
            return
        torch.cuda.synchronize()
        wall = time.perf_counter() - self._started
        self._profiler.__exit__(None, None, None)
        work_dir = Path(runner.work_dir)
        (work_dir / PROFILE_NAME).write_text(json.dumps(summary(self._profiler.events(), wall), indent=2) + "\n")
        self._profiler.export_chrome_trace(str(work_dir / PROFILE_TRACE_NAME))
        self._profiler = None


def summary(events, wall_seconds: float) -> dict:
    """Kernel seconds by kind, the recompute's, the idle rest, and the costliest kernels."""
    from torch.autograd import DeviceType

    # a record_function range shows on the GPU too, as an annotation spanning its kernels
    kernels = [e for e in events if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
    by_kind: dict[str, float] = {kind: 0.0 for kind in KERNEL_KINDS}
    by_name: dict[str, list] = {}
    for kernel in kernels:
        seconds = kernel.time_range.elapsed_us() / 1e6
        by_kind[kind_of(kernel.name)] += seconds
        entry = by_name.setdefault(kernel.name, [0.0, 0])
        entry[0] += seconds
        entry[1] += 1
    ranges = [e for e in events if e.name == RECOMPUTE_RANGE and e.device_type == DeviceType.CPU]
    recompute = sum(e.device_time_total for e in ranges) / 1e6
    busy = sum(by_kind.values())
    return {
        "iterations": [i + 1 for i in PROFILED_ITERATIONS],
        "wall_seconds": wall_seconds,
        "kernel_seconds": busy,
        "idle_seconds": max(0.0, wall_seconds - busy),
        "by_kind_seconds": by_kind,
        "recompute_seconds": recompute,
        "top_kernels": [
            {"name": name[:160], "seconds": seconds, "calls": calls}
            for name, (seconds, calls) in sorted(by_name.items(), key=lambda item: -item[1][0])[:15]
        ],
    }
