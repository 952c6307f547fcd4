"""Speed over a steady window of the metrics stream.

The first logged interval holds start-up effects (allocator warm-up, kernel
selection, the first data loads), so it is left out whenever later ones exist; the
window used is always stated.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from bench.verdict.metrics import MetricsRecord

# No training step takes less than a microsecond: a shorter logged time is not a
# measurement (and rates divided by it would overflow to infinity).
SHORTEST_CREDIBLE_SECONDS = 1e-6


@dataclass(frozen=True)
class Throughput:
    window_first_step: int | None
    window_last_step: int | None
    logged_intervals: int
    seconds_per_step_mean: float | None
    seconds_per_step_median: float | None
    seconds_per_step_p95: float | None
    samples_per_second_per_device: float | None
    samples_per_second: float | None
    data_time_share: float | None
    peak_memory_mib: float | None
    xtuner_tflops_per_device: float | None  # XTuner's own figure, kept for the seed comparison
    xtuner_tokens_per_second_per_device: float | None
    text_tokens_per_sample: float | None  # padded, without the image placeholder
    text_tokens_source: str | None  # "logged" (TokenCountHook) or "estimated" (from XTuner's figures)
    labelled_tokens_per_sample: float | None  # None unless logged


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def p95(values: list[float]) -> float:
    """Nearest-rank 95th percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def measure(
    records: list[MetricsRecord],
    accumulative_counts: int,
    per_device_batch: int,
    world_size: int,
) -> Throughput:
    timed = [r for r in records if r.time is not None and r.time >= SHORTEST_CREDIBLE_SECONDS]
    window = timed[1:] if len(timed) > 1 else timed
    if not window:
        return Throughput(None, None, 0, *([None] * 12))
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
        seconds_per_step_p95=p95(per_step),
        samples_per_second_per_device=samples_per_step / mean,
        samples_per_second=samples_per_step * world_size / mean,
        data_time_share=(
            statistics.fmean(data_times) / statistics.fmean(r.time for r in window)
            if len(data_times) == len(window)
            else None
        ),
        peak_memory_mib=max(memories, default=None),
        xtuner_tflops_per_device=_mean([r.tflops for r in window if r.tflops is not None]),
        xtuner_tokens_per_second_per_device=_mean([r.tokens_per_sec for r in window if r.tokens_per_sec is not None]),
        **_token_counts(records, window, per_device_batch),
    )


def _token_counts(records: list[MetricsRecord], window: list[MetricsRecord], per_device_batch: int) -> dict:
    """Text and labelled tokens a sample: the latest running means TokenCountHook logged;
    without them, text tokens estimated as XTuner's last-iteration tokens_per_sec times
    the interval's mean time (close, not exact), and labelled tokens unknown."""
    logged = [r for r in records if r.text_tokens_per_sample is not None and r.labelled_tokens_per_sample is not None]
    if logged:
        last = max(logged, key=lambda r: r.iter)
        return {
            "text_tokens_per_sample": last.text_tokens_per_sample,
            "text_tokens_source": "logged",
            "labelled_tokens_per_sample": last.labelled_tokens_per_sample,
        }
    estimates = [r.tokens_per_sec * r.time / per_device_batch for r in window if r.tokens_per_sec is not None]
    return {
        "text_tokens_per_sample": _mean(estimates),
        "text_tokens_source": "estimated" if estimates else None,
        "labelled_tokens_per_sample": None,
    }
