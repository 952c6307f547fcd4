"""The pinned LR schedule against the run it is asked for. The schedule is counted in
epochs (a 3 % linear warm-up, then a cosine to the epoch's end), so its length in
iterations follows the records, the per-device batch and the processes: too few
records leave no warm-up, and more steps than the schedule holds train past its end."""

from __future__ import annotations

import math

from bench.recipe.micro_batches import iterations_an_epoch

# The fewest warm-up iterations that raise the LR: mmengine's LinearLR warms up over
# int(0.03 x iterations an epoch) iterations and reaches start + (1 - start) x (w - 1) / w
# of the LR at its last one, where the cosine takes over from; with w = 1 that is the
# start factor 1e-5 (an LR of 1e-8 for the whole run: the projector does not train),
# with w = 0 mmengine refuses the schedule ("end should be larger than begin").
FEWEST_WARMUP_ITERATIONS = 2


def epoch_problem(
    max_steps: int, records: int, per_device_batch: int, world_size: int, accumulative_counts: int, epochs: float
) -> str | None:
    """Why ``max_steps`` is past the end of the LR schedule (``epochs`` long), or None.
    Past it the schedule has no LR left to give (the cosine ends at its minimum) and
    the sampler deals the records again, so no step there is the benchmark's; a count
    far past it also overflows the trainer. The records are the JSON's: XTuner's
    filters can only make the epoch shorter."""
    steps = int(iterations_an_epoch(records, per_device_batch, world_size) * epochs) // accumulative_counts
    if max_steps <= steps:
        return None
    return (
        f"{max_steps} optimizer steps, but the LR schedule ends after {steps}: {records} record(s) at per-device "
        f"batch {per_device_batch} on {world_size} process(es) with accumulation {accumulative_counts} make "
        f"{steps} steps in its {epochs:g} epoch(s); past its end the LR is spent and the records repeat"
    )


def warmup_problem(records: int, per_device_batch: int, world_size: int) -> str | None:
    """Why the pinned schedule cannot train on this few records, or None: an epoch
    needs 67 iterations, ceil(ceil(records / processes) / per-device batch) >= 67, for
    int(0.03 x 67) = 2 warm-up iterations."""
    iterations = iterations_an_epoch(records, per_device_batch, world_size)
    warmup = int(0.03 * iterations)
    if warmup >= FEWEST_WARMUP_ITERATIONS:
        return None
    fewest = math.ceil(FEWEST_WARMUP_ITERATIONS / 0.03)
    needed = world_size * (fewest - 1) * per_device_batch + 1
    consequence = (
        "mmengine refuses a warm-up of none"
        if warmup == 0
        else "a warm-up of 1 iteration leaves the LR at 1e-8 for the whole run: the projector would not train"
    )
    return (
        f"{records} record(s) make {iterations} iteration(s) an epoch at per-device batch {per_device_batch} on "
        f"{world_size} process(es), so the recipe's 3 % warm-up is {warmup} iteration(s): {consequence}; it needs "
        f"at least {fewest} iterations an epoch (at least {needed} records)"
    )
