"""The benchmark's judgement: did the logged loss fall below target within max_steps?

A pure function of the metrics records, the criteria and how the training process
ended (docs/VERDICT.md), so ``llava-bench verdict`` can recompute it offline.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from bench.core.statuses import EXIT_CODES, Criteria, Termination
from bench.verdict.metrics import MetricsRecord, is_finite


@dataclass(frozen=True)
class CurvePoint:
    iter: int  # the logged micro-iteration
    step: int  # the optimizer step it belongs to
    loss: float  # may be NaN or infinite; the verdict writes those as null


@dataclass(frozen=True)
class Judgement:
    status: str
    reason: str
    curve: list[CurvePoint]
    steps_completed: int
    first_step_below_target: int | None
    first_iter_below_target: int | None  # the micro-iteration of that logged loss
    loss_at_crossing: float | None
    final_loss: float | None
    min_loss: float | None
    stayed_below_after_crossing: bool | None
    notes: list[str]  # what is implausible about the stream, in words

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.status]


def loss_curve(records: list[MetricsRecord], accumulative_counts: int, max_steps: int) -> list[CurvePoint]:
    """Every logged loss at an optimizer step up to ``max_steps``, in iteration order.

    With accumulation several logged losses share a step, and each counts. After a
    restart the stream repeats iterations; the later record stays in the curve, since
    it is the one the finished run stands on.
    """
    by_iter: dict[int, float] = {}
    for record in records:
        if 1 <= record.step(accumulative_counts) <= max_steps:
            by_iter[record.iter] = record.loss
    return [CurvePoint(i, -(-i // accumulative_counts), by_iter[i]) for i in sorted(by_iter)]


def first_crossing(records: list[MetricsRecord], criteria: Criteria, accumulative_counts: int) -> CurvePoint | None:
    """The earliest logged loss below the target at a step up to max_steps, records a
    restart superseded included: logging an iteration again does not undo a loss the
    run already reached."""
    crossings = [
        r
        for r in records
        if 1 <= r.step(accumulative_counts) <= criteria.max_steps
        and is_finite(r.loss)
        and r.loss < criteria.target_loss
    ]
    first = min(crossings, key=lambda r: r.iter, default=None)
    return None if first is None else CurvePoint(first.iter, first.step(accumulative_counts), first.loss)


# mmengine logs the loss and the times as means over the last 10 iterations (its
# LogProcessor's window); the recipe logs every 10, so the means tile the run.
LOGGED_MEAN_WINDOW = 10


def log_interval(records: list[MetricsRecord]) -> int | None:
    """Iterations between logged records: the most common gap (mmengine logs every
    ``interval``), or the first iteration when only one record exists."""
    iterations = sorted({r.iter for r in records})
    gaps = Counter(b - a for a, b in zip(iterations, iterations[1:]))
    if gaps:
        return gaps.most_common(1)[0][0]
    return iterations[0] if iterations else None


def stream_notes(records: list[MetricsRecord], criteria: Criteria, accumulative_counts: int) -> list[str]:
    """What a reader of the verdict should know about the stream itself."""
    notes = []
    counts = Counter(r.iter for r in records)
    repeated = sorted(i for i, n in counts.items() if n > 1)
    if repeated:
        notes.append(
            f"{len(repeated)} iteration(s) logged more than once ({repeated[0]}-{repeated[-1]}): a restarted trainer; "
            "the curve keeps the later records, a crossing counts from either"
        )
    interval = log_interval(records)
    if interval is not None and interval != LOGGED_MEAN_WINDOW and len(counts) > 1:
        notes.append(
            f"logged every {interval} iterations, but mmengine's losses and times are means over the last "
            f"{LOGGED_MEAN_WINDOW}: the logged means "
            f"{'overlap' if interval < LOGGED_MEAN_WINDOW else 'leave iterations out'}"
        )
    if records and interval and min(counts) > interval:
        notes.append(
            f"the stream starts at iteration {min(counts)}, not {interval}: iterations 1-{min(counts) - interval} are "
            "missing (a resumed run, or a stream cut at its head)"
        )
    first = min(records, key=lambda r: r.iter, default=None)
    if first is not None and is_finite(first.loss) and first.loss < criteria.target_loss:
        notes.append(
            f"the first logged loss ({first.loss:.4f} at step {first.step(accumulative_counts)}) is already below the "
            f"target {criteria.target_loss}: the loss was below it before training could lower it"
        )
    return notes


def judge(
    records: list[MetricsRecord],
    criteria: Criteria,
    termination: Termination,
    accumulative_counts: int = 1,
    trained_steps: int | None = None,
) -> Judgement:
    """``trained_steps``: the steps a completed run was set to train (its recipe's), so
    that criteria asking for more steps than it trained are not answered from it."""
    curve = loss_curve(records, accumulative_counts, criteria.max_steps)
    crossing = first_crossing(records, criteria, accumulative_counts)
    if criteria.stop_on_target and crossing is not None:
        # The run ends at the first crossing; what the trainer logged while it was
        # being stopped is not part of it.
        curve = [p for p in curve if p.iter <= crossing.iter]
    finite = [point for point in curve if is_finite(point.loss)]
    non_finite = next((p for p in curve if not is_finite(p.loss)), None)
    last_step = curve[-1].step if curve else 0
    stayed_below = None
    if crossing is not None:
        stayed_below = all(p.loss < criteria.target_loss for p in finite if p.iter >= crossing.iter)
    lowest = min(finite, key=lambda p: p.loss, default=None)

    def judgement(status: str, reason: str) -> Judgement:
        return Judgement(
            status=status,
            reason=reason,
            curve=curve,
            steps_completed=last_step,
            first_step_below_target=crossing.step if crossing else None,
            first_iter_below_target=crossing.iter if crossing else None,
            loss_at_crossing=crossing.loss if crossing else None,
            final_loss=curve[-1].loss if curve else None,
            min_loss=lowest.loss if lowest else None,
            stayed_below_after_crossing=stayed_below,
            notes=stream_notes(records, criteria, accumulative_counts),
        )

    target = criteria.target_loss
    detail = f": {termination.detail}" if termination.detail else ""
    if termination.kind == "aborted":
        return judgement("aborted", f"stopped from outside at step {last_step}{detail}")
    if termination.kind in ("crashed", "stalled"):
        return judgement("error", f"training {termination.kind} at step {last_step}{detail}")
    if non_finite is not None:
        return judgement("fail", f"non-finite loss ({non_finite.loss}) at step {non_finite.step}")
    if termination.kind == "stopped_nonfinite_loss":  # seen by the appliance, even if outside the curve
        return judgement("fail", f"non-finite loss: {termination.detail or 'the appliance stopped the run'}")
    if crossing is not None:
        return judgement(
            "pass",
            f"loss {crossing.loss:.4f} < {target} at step {crossing.step} (within {criteria.max_steps} steps)",
        )
    if not curve:
        return judgement("error", "the metrics stream holds no training record")
    if termination.kind == "completed" and trained_steps is not None and trained_steps < criteria.max_steps:
        # The same answer its bare stream gets: steps it never trained cannot fail.
        return judgement(
            "error",
            f"the run trained {trained_steps} steps, fewer than the {criteria.max_steps} the criteria ask, without "
            f"a loss below {target} (last loss {curve[-1].loss:.4f}): whether it falls below by step "
            f"{criteria.max_steps} is not known",
        )
    if termination.kind == "completed" or last_step >= criteria.max_steps:
        return judgement(
            "fail",
            f"loss never below {target} within {criteria.max_steps} steps: "
            f"final {curve[-1].loss:.4f} at step {last_step}, minimum {lowest.loss:.4f} at step {lowest.step}",
        )
    return judgement(
        "error",
        f"the metrics stream ends at step {last_step}, before step {criteria.max_steps}, "
        f"without a loss below {target} (last loss {curve[-1].loss:.4f})",
    )
