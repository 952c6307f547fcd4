"""The benchmark's judgement: did the logged loss fall below target within max_steps?

A pure function of the metrics records, the criteria and how the training process
ended (DESIGN §3), so ``llava-bench verdict`` can recompute it offline.
"""
from __future__ import annotations

from dataclasses import dataclass

from bench.metrics import MetricsRecord, is_finite

# Fixed vocabularies: a third party can rely on these words.
STATUSES = ("pass", "fail", "invalid", "error", "aborted")
EXIT_CODES = {"pass": 0, "fail": 1, "invalid": 2, "error": 3, "aborted": 3}
TERMINATIONS = (
    "completed",  # the trainer ran all its iterations and exited 0
    "stopped_on_target",  # the appliance stopped it at the first crossing (--stop-on-target)
    "stopped_nonfinite_loss",  # the appliance stopped it at a NaN/inf loss (the verdict is fail)
    "crashed",  # the trainer exited non-zero
    "stalled",  # the watchdog stopped it
    "aborted",  # a signal from outside stopped it
    "unknown",  # only a metrics stream is known (``verdict`` on a bare stream)
)


@dataclass(frozen=True)
class Criteria:
    target_loss: float = 2.3
    max_steps: int = 500
    stop_on_target: bool = False


@dataclass(frozen=True)
class Termination:
    """How the training process ended, as the launcher saw it."""

    kind: str = "unknown"
    detail: str = ""

    def __post_init__(self):
        if self.kind not in TERMINATIONS:
            raise ValueError(f"termination must be one of {TERMINATIONS}, not {self.kind!r}")


@dataclass(frozen=True)
class CurvePoint:
    step: int
    loss: float  # may be NaN or infinite; the verdict writes those as null


@dataclass(frozen=True)
class Judgement:
    status: str
    reason: str
    curve: list[CurvePoint]
    steps_completed: int
    first_step_below_target: int | None
    loss_at_crossing: float | None
    final_loss: float | None
    min_loss: float | None
    stayed_below_after_crossing: bool | None

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.status]


def loss_curve(records: list[MetricsRecord], accumulative_counts: int, max_steps: int) -> list[CurvePoint]:
    """One point per optimizer step up to ``max_steps``, in step order.

    After a restart the stream repeats steps; the later record wins, since it is the
    one the finished run stands on.
    """
    by_step: dict[int, float] = {}
    for record in records:
        step = record.step(accumulative_counts)
        if 1 <= step <= max_steps:
            by_step[step] = record.loss
    return [CurvePoint(step, by_step[step]) for step in sorted(by_step)]


def judge(
    records: list[MetricsRecord],
    criteria: Criteria,
    termination: Termination,
    accumulative_counts: int = 1,
) -> Judgement:
    curve = loss_curve(records, accumulative_counts, criteria.max_steps)
    crossing = next((p for p in curve if is_finite(p.loss) and p.loss < criteria.target_loss), None)
    if criteria.stop_on_target and crossing is not None:
        # The run ends at the first crossing; steps the trainer logged while it was
        # being stopped are not part of it.
        curve = [p for p in curve if p.step <= crossing.step]
    finite = [point for point in curve if is_finite(point.loss)]
    non_finite = next((p for p in curve if not is_finite(p.loss)), None)
    last_step = curve[-1].step if curve else 0
    stayed_below = None
    if crossing is not None:
        stayed_below = all(p.loss < criteria.target_loss for p in finite if p.step >= crossing.step)
    lowest = min(finite, key=lambda p: p.loss, default=None)

    def judgement(status: str, reason: str) -> Judgement:
        return Judgement(
            status=status,
            reason=reason,
            curve=curve,
            steps_completed=last_step,
            first_step_below_target=crossing.step if crossing else None,
            loss_at_crossing=crossing.loss if crossing else None,
            final_loss=curve[-1].loss if curve else None,
            min_loss=lowest.loss if lowest else None,
            stayed_below_after_crossing=stayed_below,
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
            f"loss {crossing.loss:.4f} < {target} at step {crossing.step} "
            f"(within {criteria.max_steps} steps)",
        )
    if not curve:
        return judgement("error", "the metrics stream holds no training record")
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
