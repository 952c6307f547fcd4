"""Assemble, validate, write and recompute the verdict (docs/VERDICT.md).

The verdict is a pure function of recorded inputs: the run context stored inside
``verdict.json`` and the copied metrics stream. ``recompute`` rebuilds it from
exactly those two, so a third party can check every figure.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from dataclasses import replace
from importlib import resources
from pathlib import Path

import jsonschema
from referencing import Registry, Resource

from bench.core.run_folder import METRICS_NAME
from bench.core.statuses import EXIT_CODES, Criteria, Termination
from bench.verdict import run_context
from bench.verdict.judgement import judge, log_interval
from bench.verdict.metrics import MetricsStream, read_stream
from bench.verdict.ranks import ranks_section
from bench.verdict.run_context import RunContext
from bench.verdict.sections import (
    DERIVED_TIMING,
    baseline_section,
    judgement_section,
    throughput_section,
    timing_section,
)

SCHEMA_VERSION = 2
VERDICT_NAME = "verdict.json"


def build(context: RunContext, stream: MetricsStream) -> dict:
    """The verdict document for one run (or one bare metrics stream)."""
    max_iters = (context.recipe or {}).get("max_iters")
    judgement = judge(
        stream.records,
        context.criteria,
        context.termination,
        context.accumulative_counts,
        trained_steps=max_iters // context.accumulative_counts if max_iters else None,
    )
    throughput = throughput_section(context, stream)
    status, reason = judgement.status, judgement.reason
    if context.problems:
        status = "invalid"
        reason = f"preflight refused the run: {len(context.problems)} problem(s); see problems"
    derived = {
        "schema_version": SCHEMA_VERSION,
        "status": status,
        "reason": reason,
        "exit_code": EXIT_CODES[status],
        "result": judgement_section(judgement, stream.skipped_lines),
        "metrics_sha256": stream.sha256,
        "throughput": throughput,
        "baseline": baseline_section(context, throughput),
        "timing": timing_section(
            context,
            stream,
            judgement.first_iter_below_target,
            ((throughput or {}).get("seconds_per_step") or {}).get("mean"),
        ),
        "ranks": ranks_section(context.rank_times),
        "notes": [*_recipe_notes(context.recipe), *judgement.notes, *_unobserved_notes(context, stream)],
    }
    return in_schema_order(run_context.to_json(context) | derived)


def in_schema_order(verdict: dict) -> dict:
    """The verdict's sections in the order the schema lists them: one order, written once."""
    order = _section_order()
    unknown = set(verdict) - set(order)
    if unknown:
        raise ValueError(f"verdict sections the schema does not declare: {sorted(unknown)}")
    return {key: verdict[key] for key in order if key in verdict}


@functools.cache
def _section_order() -> tuple[str, ...]:
    return tuple(schema()["properties"])


def _recipe_notes(recipe: dict | None) -> list[str]:
    """A run off the reference schedule says what its target then means; what the
    config XTuner ran did not say back is named."""
    unverified = (recipe or {}).get("unverified")
    not_read = (
        [f"not read back from the config XTuner ran or the data it read: {', '.join(unverified)}"] if unverified else []
    )
    if not recipe or recipe.get("on_reference_schedule", True):
        return not_read
    return [
        *not_read,
        f"global batch {recipe['global_batch']}, not the reference {recipe['reference_global_batch']}: max_steps "
        "covers "
        "other samples and the epoch-based LR schedule follows the global batch, so the target is not the reference "
        "run's criterion (--global-batch sets it)",
    ]


def _unobserved_notes(context: RunContext, stream: MetricsStream) -> list[str]:
    """Iterations a completed run trained but never logged (mmengine logs every interval,
    and not at the last iteration): the verdict cannot judge them, and says so."""
    max_iters = (context.recipe or {}).get("max_iters")
    last = max((record.iter for record in stream.records), default=0)
    if context.termination.kind != "completed" or not max_iters or not stream.records or last >= max_iters:
        return []
    return [
        f"iterations {last + 1}-{max_iters} ran but were not logged (the metrics are logged every "
        f"{log_interval(stream.records) or last} iterations): their losses are not judged; a --max-steps that the "
        "logging interval divides has every step observed"
    ]


def schema(name: str = "verdict.schema.json") -> dict:
    """One of the appliance's schemas (schemas/): the verdict's by default."""
    return json.loads(resources.files("schemas").joinpath(name).read_text())


def validate(verdict: dict) -> None:
    """Raise ``jsonschema.ValidationError`` unless ``verdict`` matches the schema."""
    jsonschema.Draft202012Validator(schema()).validate(verdict)


def validate_node_document(document: dict) -> None:
    """Raise ``jsonschema.ValidationError`` unless a node other than 0's node-<rank>.json
    matches its schema (whose termination and problems are the verdict schema's)."""
    verdict_schema = schema()
    registry = Registry().with_resource(verdict_schema["$id"], Resource.from_contents(verdict_schema))
    jsonschema.Draft202012Validator(schema("node.schema.json"), registry=registry).validate(document)


def write_node_document(path: Path, document: dict) -> None:
    validate_node_document(document)
    write_atomic(path, json.dumps(document, indent=2) + "\n")


def dumps(verdict: dict) -> str:
    return json.dumps(verdict, indent=2, allow_nan=False) + "\n"


def write_atomic(path: Path, text: str) -> None:
    """Readers see the old file or the whole new one, never a partial write."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write(results_dir: Path, verdict: dict) -> Path:
    validate(verdict)
    path = Path(results_dir) / VERDICT_NAME
    write_atomic(path, dumps(verdict))
    return path


def context_from_verdict(verdict: dict) -> RunContext:
    """The recorded inputs of a stored verdict."""
    return run_context.from_json({**verdict, "timing": _recorded_timing(verdict.get("timing"))})


def _recorded_timing(timing: dict | None) -> dict | None:
    """The timing a verdict recorded, without what build derives from it."""
    if timing is None:
        return None
    return {key: value for key, value in timing.items() if key not in DERIVED_TIMING}


def changes_since_the_run(stored: dict, recomputed: dict) -> list[str]:
    """What a recomputed verdict says that its results folder's stored one did not: a
    metrics stream that changed since the run (its hash), and another result."""
    said = []
    if stored.get("metrics_sha256") and stored["metrics_sha256"] != recomputed["metrics_sha256"]:
        said.append(
            f"the metrics stream changed since the run: its sha256 is {recomputed['metrics_sha256']}, the run "
            f"recorded {stored['metrics_sha256']}"
        )
    if (stored["status"], stored["reason"]) != (recomputed["status"], recomputed["reason"]):
        said.append(
            f"the recomputed verdict differs from the stored one: {recomputed['status'].upper()} "
            f"({recomputed['reason']}), stored {stored['status'].upper()} ({stored['reason']})"
        )
    return said


def recompute(results_dir: Path, criteria: Criteria | None = None) -> dict:
    """Rebuild the verdict of a results folder from its stored inputs.

    ``criteria`` replaces the recorded ones (to ask "would it pass at another target?").
    """
    results_dir = Path(results_dir)
    context = context_from_verdict(json.loads((results_dir / VERDICT_NAME).read_text()))
    if criteria is not None:
        context = replace(context, criteria=criteria)
    metrics = results_dir / METRICS_NAME
    stream = read_stream(metrics) if metrics.exists() else MetricsStream([], 0)
    return build(context, stream)


def from_stream(path: Path, criteria: Criteria, accumulative_counts: int = 1) -> dict:
    """A verdict for a bare metrics stream: nothing is known about how the run ended."""
    context = RunContext(
        run_id=Path(path).name,
        criteria=criteria,
        termination=Termination("unknown"),
        accumulative_counts=accumulative_counts,
    )
    return build(context, read_stream(path))
