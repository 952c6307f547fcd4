"""Speed over a steady window of the metrics stream.

The first logged interval holds start-up effects (allocator warm-up, kernel
selection, the first data loads), so it is left out whenever later ones exist; the
window used is always stated.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass

from bench.metrics import MetricsRecord


@dataclass(frozen=True)
class Throughput:
    window_first_step: int | None
    window_last_step: int | None
    logged_intervals: int
    seconds_per_step_mean: float | None
    seconds_per_step_median: float | None
    samples_per_second_per_device: float | None
    samples_per_second: float | None
    data_time_share: float | None
    peak_memory_mib: float | None


def measure(
    records: list[MetricsRecord],
    accumulative_counts: int,
    per_device_batch: int,
    world_size: int,
) -> Throughput:
    timed = [r for r in records if r.time is not None and r.time > 0]
    window = timed[1:] if len(timed) > 1 else timed
    if not window:
        return Throughput(None, None, 0, None, None, None, None, None, None)
    # ``time`` is seconds per micro-iteration; a step is accumulative_counts of them.
    per_step = [r.time * accumulative_counts for r in window]
    mean = statistics.fmean(per_step)
    samples_per_step = per_device_batch * accumulative_counts
    data_times = [r.data_time for r in window if r.data_time is not None]
    memories = [r.memory for r in records if r.memory is not None]
    return Throughput(
        window_first_step=window[0].step(accumulative_counts),
        window_last_step=window[-1].step(accumulative_counts),
        logged_intervals=len(window),
        seconds_per_step_mean=mean,
        seconds_per_step_median=statistics.median(per_step),
        samples_per_second_per_device=samples_per_step / mean,
        samples_per_second=samples_per_step * world_size / mean,
        data_time_share=(
            statistics.fmean(data_times) / statistics.fmean(r.time for r in window)
            if len(data_times) == len(window)
            else None
        ),
        peak_memory_mib=max(memories, default=None),
    )
