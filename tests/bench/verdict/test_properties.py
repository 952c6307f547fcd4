"""Property tests: arbitrary metrics streams never crash the parser or the verdict,
and never yield a pass the stream does not support."""

from __future__ import annotations

import json
import math

from hypothesis import example, given, settings
from hypothesis import strategies as st

from bench.core.statuses import TERMINATIONS, Criteria, Termination
from bench.verdict import document as verdict_mod
from bench.verdict.judgement import judge
from bench.verdict.metrics import is_finite, parse_stream

losses = st.one_of(
    st.floats(min_value=-1.0, max_value=20.0),
    st.sampled_from([math.nan, math.inf, -math.inf]),
)
records = st.fixed_dictionaries(
    {"iter": st.integers(min_value=-5, max_value=700), "loss": losses},
    optional={
        "time": st.one_of(st.floats(min_value=0, max_value=100), st.none(), st.text(max_size=3)),
        "data_time": st.floats(min_value=0, max_value=10),
        "tokens_per_sec": st.floats(min_value=0, max_value=1e6),
        "memory": st.integers(min_value=0, max_value=200_000),
        "lr": st.floats(allow_nan=True),
    },
)
garbage = st.one_of(st.text(max_size=40), st.just("[1, 2]"), st.just('{"iter": "ten", "loss": 1}'), st.just("{"))
lines = st.lists(st.one_of(records.map(json.dumps), garbage), max_size=60)
criteria = st.builds(
    Criteria,
    target_loss=st.floats(min_value=1e-3, max_value=20.0),
    max_steps=st.integers(min_value=1, max_value=600),
    stop_on_target=st.booleans(),
)
terminations = st.builds(Termination, kind=st.sampled_from(TERMINATIONS))


@settings(max_examples=300, deadline=None)
@given(lines, criteria, terminations, st.integers(min_value=1, max_value=8))
# found by hypothesis: a subnormal time made the rates infinite, which strict JSON refuses
@example(['{"iter": 1, "loss": 0.0, "time": 2.2250738585e-313}'], Criteria(0.5, 1), Termination("completed"), 1)
def test_any_stream_gives_a_valid_verdict_and_no_unsupported_pass(stream_lines, crit, termination, accumulation):
    stream = parse_stream("\n".join(stream_lines))
    judgement = judge(stream.records, crit, termination, accumulation)
    if judgement.status == "pass":
        in_range = [r for r in stream.records if 1 <= r.step(accumulation) <= crit.max_steps]
        assert termination.kind in ("completed", "stopped_on_target", "unknown")
        assert any(is_finite(r.loss) and r.loss < crit.target_loss for r in in_range)
        # no non-finite loss up to the crossing (nor after it, unless the run stopped there)
        assert all(is_finite(p.loss) for p in judgement.curve)
        assert judgement.first_step_below_target <= crit.max_steps
    if termination.kind in ("crashed", "stalled", "aborted"):
        assert judgement.status in ("error", "aborted")
    context = verdict_mod.RunContext(
        run_id="p",
        criteria=crit,
        termination=termination,
        accumulative_counts=accumulation,
        per_device_batch=8,
        world_size=2,
    )
    document = verdict_mod.build(context, stream)
    verdict_mod.validate(document)
    json.loads(verdict_mod.dumps(document))  # strict JSON


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=500))
def test_the_parser_never_crashes_on_any_text(text):
    stream = parse_stream(text)
    assert all(r.iter >= 1 for r in stream.records)
    assert stream.skipped_lines <= len(text.splitlines())


@settings(max_examples=300, deadline=None)
@given(
    st.integers(min_value=1, max_value=64),  # accumulative_counts
    st.lists(st.floats(min_value=0.5, max_value=5.0), min_size=1, max_size=80),  # one loss every 10 iterations
    st.floats(min_value=0.6, max_value=4.9),
    st.integers(min_value=1, max_value=100),
    st.booleans(),
)
def test_under_accumulation_every_logged_loss_counts(accumulation, losses, target, max_steps, stop_on_target):
    """mmengine logs every 10 micro-iterations, so with accumulation several logged
    losses share a step: the run passes exactly when one of them, at a step up to
    max_steps, is below the target, and the first crossing is the earliest such step."""
    lines = [json.dumps({"iter": 10 * (i + 1), "loss": loss, "time": 1.0}) for i, loss in enumerate(losses)]
    records = parse_stream("\n".join(lines)).records
    crit = Criteria(target_loss=target, max_steps=max_steps, stop_on_target=stop_on_target)
    termination = Termination("stopped_on_target" if stop_on_target else "completed")
    judgement = judge(records, crit, termination, accumulation)
    crossing_steps = [r.step(accumulation) for r in records if r.step(accumulation) <= max_steps and r.loss < target]
    if crossing_steps:
        assert judgement.status == "pass"
        assert judgement.first_step_below_target == min(crossing_steps)
    else:
        assert judgement.status in ("fail", "error")  # error: the stream ends before max_steps
    in_range = [r for r in records if r.step(accumulation) <= max_steps]
    points = judgement.curve
    assert [p.iter for p in points] == [r.iter for r in in_range][: len(points)]
    if not stop_on_target:
        assert len(points) == len(in_range)  # none dropped
