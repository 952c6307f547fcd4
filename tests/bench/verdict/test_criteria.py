"""Verdict logic on recorded and hand-made metrics streams (docs/VERDICT.md)."""

from __future__ import annotations

import json
import math

import pytest

from bench.core.statuses import Criteria, Termination
from bench.verdict.judgement import judge, loss_curve
from bench.verdict.metrics import parse_stream, read_stream
from tests.conftest import DATA


def stream(*points: tuple[int, float]) -> list:
    text = "\n".join(json.dumps({"iter": i, "loss": loss, "time": 1.0, "data_time": 0.1}) for i, loss in points)
    return parse_stream(text).records


COMPLETED = Termination("completed")


def test_seed_a100_lines_end_before_max_steps_so_error_names_step_380():
    records = read_stream(DATA / "seed_a100_metrics.jsonl").records
    judgement = judge(records, Criteria(), Termination("unknown"))
    assert judgement.status == "error"
    assert "step 380" in judgement.reason
    assert judgement.steps_completed == 380
    assert judgement.first_step_below_target is None
    assert [p.step for p in judgement.curve] == [360, 370, 380]


def test_seed_a100_lines_pass_at_a_target_they_cross():
    records = read_stream(DATA / "seed_a100_metrics.jsonl").records
    judgement = judge(records, Criteria(target_loss=2.7), Termination("unknown"))
    assert judgement.status == "pass"
    assert judgement.first_step_below_target == 360
    assert judgement.stayed_below_after_crossing is False  # 2.719 and 2.797 follow


def test_first_crossing_is_found_at_the_right_step():
    records = stream((10, 3.0), (20, 2.5), (30, 2.29), (40, 2.35), (50, 2.1))
    judgement = judge(records, Criteria(target_loss=2.3, max_steps=50), COMPLETED)
    assert judgement.status == "pass"
    assert judgement.first_step_below_target == 30
    assert judgement.loss_at_crossing == pytest.approx(2.29)
    assert judgement.stayed_below_after_crossing is False
    assert judgement.min_loss == pytest.approx(2.1)
    assert judgement.final_loss == pytest.approx(2.1)


def test_loss_equal_to_target_is_not_below_it():
    judgement = judge(stream((10, 2.3), (20, 2.3)), Criteria(target_loss=2.3, max_steps=20), COMPLETED)
    assert judgement.status == "fail"


def test_crossing_after_max_steps_does_not_count():
    records = stream((10, 3.0), (20, 2.9), (30, 2.0))
    judgement = judge(records, Criteria(target_loss=2.3, max_steps=20), COMPLETED)
    assert judgement.status == "fail"
    assert judgement.steps_completed == 20
    assert "final 2.9000 at step 20" in judgement.reason


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_loss_is_a_fail_even_after_a_crossing(bad):
    records = stream((10, 2.0), (20, bad), (30, 1.9))
    judgement = judge(records, Criteria(target_loss=2.3, max_steps=30), COMPLETED)
    assert judgement.status == "fail"
    assert "non-finite" in judgement.reason and "step 20" in judgement.reason


def test_nan_as_mmengine_writes_it_is_parsed():
    records = parse_stream('{"iter": 10, "loss": NaN}\n').records
    assert math.isnan(records[0].loss)


def test_short_stream_without_crossing_is_error_naming_the_last_step():
    judgement = judge(stream((10, 3.0), (20, 2.9)), Criteria(max_steps=500), Termination("unknown"))
    assert judgement.status == "error"
    assert "step 20" in judgement.reason and "500" in judgement.reason


def test_a_completed_run_and_its_bare_stream_get_one_answer_for_more_steps_than_it_trained():
    """Judged at 500 steps, a run that trained 20 without crossing cannot fail steps it
    never ran: error, as its bare stream gets; at its own 20 steps both fail."""
    records = stream((10, 3.0), (20, 2.9))
    asked = Criteria(max_steps=500)
    from_the_folder = judge(records, asked, COMPLETED, trained_steps=20)
    assert from_the_folder.status == judge(records, asked, Termination("unknown")).status == "error"
    assert "trained 20 steps, fewer than the 500 the criteria ask" in from_the_folder.reason
    own = Criteria(max_steps=20)
    assert judge(records, own, COMPLETED, trained_steps=20).status == judge(records, own, Termination("unknown")).status
    assert judge(records, own, COMPLETED, trained_steps=20).status == "fail"


def test_empty_stream_is_error():
    judgement = judge([], Criteria(), COMPLETED)
    assert judgement.status == "error"
    assert "no training record" in judgement.reason


@pytest.mark.parametrize(
    "termination, status",
    [
        (Termination("crashed", "exit 1"), "error"),
        (Termination("stalled"), "error"),
        (Termination("aborted"), "aborted"),
    ],
)
def test_a_run_that_did_not_end_normally_is_never_pass_or_fail(termination, status):
    judgement = judge(stream((10, 1.0)), Criteria(max_steps=10), termination)
    assert judgement.status == status
    assert judgement.first_step_below_target == 10  # the partial curve is still recorded


def test_restart_duplicates_keep_the_later_value():
    records = stream((10, 3.0), (20, 2.0), (10, 3.1), (20, 2.8), (30, 2.7))
    curve = loss_curve(records, accumulative_counts=1, max_steps=30)
    assert [(p.step, p.loss) for p in curve] == [(10, 3.1), (20, 2.8), (30, 2.7)]


def test_steps_are_optimizer_steps_under_accumulation():
    records = stream((40, 3.0), (80, 2.2))
    judgement = judge(records, Criteria(target_loss=2.3, max_steps=20), COMPLETED, accumulative_counts=4)
    assert [p.step for p in judgement.curve] == [10, 20]
    assert judgement.first_step_below_target == 20


def test_garbage_lines_are_skipped_and_counted():
    parsed = parse_stream('not json\n{"iter": 10, "loss": 2.0}\n[1, 2]\n{"iter": "x", "loss": 1}\n\n{"mode": "val"}\n')
    assert len(parsed.records) == 1
    assert parsed.skipped_lines == 4


def test_unknown_termination_kind_is_refused():
    with pytest.raises(ValueError):
        Termination("finished")


def test_stop_on_target_ends_the_curve_at_the_first_crossing():
    records = stream((10, 3.0), (20, 2.2), (30, 2.1))
    judgement = judge(
        records, Criteria(target_loss=2.3, max_steps=30, stop_on_target=True), Termination("stopped_on_target")
    )
    assert judgement.status == "pass"
    assert [p.step for p in judgement.curve] == [10, 20]
    assert judgement.steps_completed == 20


def test_a_run_stopped_for_a_non_finite_loss_fails_even_if_the_curve_misses_it():
    # accumulation 16: the NaN at iteration 5 belongs to step 1, logged before any crossing record
    records = stream((5, math.nan), (32, 1.0))
    judgement = judge(
        records,
        Criteria(target_loss=2.3, max_steps=2),
        Termination("stopped_nonfinite_loss", "loss nan at iteration 5"),
        16,
    )
    assert judgement.status == "fail"
    assert "non-finite" in judgement.reason


# name: (records (iter, loss), criteria, termination, accumulation, status, first crossing step, words in a note);
# the accumulated streams hold a run's last records only (their notes say the rest is missing)
CRAFTED = {
    "accumulation: a crossing logged before the step's last record counts": (
        [(15970, 2.6), (15980, 2.2), (15990, 2.4), (16000, 2.5)],
        Criteria(max_steps=500),
        COMPLETED,
        32,
        "pass",
        500,
        None,
    ),
    "accumulation: the appliance stopped at that crossing, between two records of one step": (
        [(15970, 2.6), (15980, 2.2)],
        Criteria(max_steps=500, stop_on_target=True),
        Termination("stopped_on_target"),
        32,
        "pass",
        500,
        None,
    ),
    "a restart logs a crossed iteration again above the target: the crossing still counts": (
        [(10, 3.0), (20, 2.2), (10, 3.1), (20, 2.5), (30, 2.4)],
        Criteria(max_steps=30),
        COMPLETED,
        1,
        "pass",
        20,
        "logged more than once",
    ),
    "a resumed stream says which iterations are missing": (
        [(310, 2.6), (320, 2.5)],
        Criteria(max_steps=320),
        COMPLETED,
        1,
        "fail",
        None,
        "iterations 1-300 are missing",
    ),
    "a first loss already below the target passes, and says so": (
        [(10, 2.0), (20, 1.9)],
        Criteria(max_steps=20),
        COMPLETED,
        1,
        "pass",
        10,
        "already below the target",
    ),
}


@pytest.mark.parametrize("name", list(CRAFTED))
def test_crafted_streams(name):
    points, crit, termination, accumulation, status, crossing, words = CRAFTED[name]
    judgement = judge(stream(*points), crit, termination, accumulation)
    assert judgement.status == status, judgement.reason
    assert judgement.first_step_below_target == crossing
    assert words is None or any(words in note for note in judgement.notes), judgement.notes


def test_every_logged_loss_of_an_accumulated_step_is_in_the_curve():
    judgement = judge(stream((15980, 2.2), (16000, 2.5)), Criteria(max_steps=500), COMPLETED, 32)
    assert [(p.iter, p.step) for p in judgement.curve] == [(15980, 500), (16000, 500)]
    assert judgement.min_loss == pytest.approx(2.2) and judgement.final_loss == pytest.approx(2.5)


@pytest.mark.parametrize("target", [math.nan, math.inf, -1.0, 0.0])
def test_a_target_no_loss_can_fall_below_is_refused(target):
    with pytest.raises(ValueError, match="finite number above 0"):
        Criteria(target_loss=target)


def test_a_whole_stream_has_no_notes():
    judgement = judge(stream((10, 3.0), (20, 2.5), (30, 2.2)), Criteria(max_steps=30), COMPLETED)
    assert judgement.status == "pass" and judgement.notes == []
