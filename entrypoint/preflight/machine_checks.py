"""The machine's checks before training, beside the layout's: enough GPU memory for
the precision at the recipe's batch, a driver for the image's CUDA, and room for the
results. Like the others, they list every problem and write nothing."""

from __future__ import annotations

import shutil
from pathlib import Path

from bench.core.problem import Problem
from bench.recipe.memory_model import REQUIRED_MIB

MIN_DRIVER = (450, 80)  # CUDA 11.8 runs on drivers >= 450.80.02 (forward compatibility)
MIN_RESULTS_FREE_BYTES = 2 * 10**9


def gpu_problems(gpus: list[dict], precision: str, per_device_batch: int, real_shapes: bool) -> list[Problem]:
    """Enough memory for the chosen precision at the recipe's batch, and a driver for CUDA 11.8."""
    problems = []
    required = REQUIRED_MIB.get(precision)
    if real_shapes and required and per_device_batch >= 32:
        small = [g for g in gpus if g["memory_mib"] < required]
        if small:
            problems.append(
                Problem(
                    f"GPU {small[0]['index']} ({small[0]['name']})",
                    f"{small[0]['memory_mib']} MiB, but {precision} at batch {per_device_batch} needs about "
                    f"{required} MiB",
                    "use --precision nf4, or a smaller --per-device-batch with --global-batch to keep the global batch",
                )
            )
    for gpu in gpus[:1]:
        driver = gpu.get("driver")
        if driver:
            major_minor = tuple(int(part) for part in driver.split(".")[:2] if part.isdigit())
            if major_minor and major_minor < MIN_DRIVER:
                problems.append(
                    Problem(
                        f"driver {driver}",
                        "too old for the image's CUDA 11.8 (needs >= 450.80.02)",
                        "update the NVIDIA driver",
                    )
                )
    return problems


def disk_problems(results_parent: Path) -> list[Problem]:
    probe = results_parent
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < MIN_RESULTS_FREE_BYTES:
        return [
            Problem(
                str(results_parent),
                f"{free / 1e9:.2f} GB free; a run's logs and results need up to {MIN_RESULTS_FREE_BYTES / 1e9:.0f} GB",
                "free space there or pass --out to a roomier folder",
            )
        ]
    return []
