"""What the verdict depends on besides the metrics stream, and where each of it stands in
the verdict: its own module, so that the verdict and the sections it is built from both
import it (neither imports the other).

A field's place in ``verdict.json`` is declared beside it (``placed``); ``to_json`` and
``from_json`` follow the declarations, so a new field is its line here and its entry in
the schema, nothing else.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field

from bench.core.statuses import Criteria, Termination

_PLACE = "verdict_path"
_ABSENT = object()


def placed(path: str, **kwargs):
    """A field written in the verdict at ``path`` ("section.key"), not under its own name."""
    return field(metadata={_PLACE: tuple(path.split("."))}, **kwargs)


@dataclass(frozen=True)
class RunContext:
    """Everything besides the metrics stream that the verdict depends on."""

    run_id: str
    criteria: Criteria
    termination: Termination
    accumulative_counts: int = 1
    per_device_batch: int | None = None
    world_size: int | None = None
    trainer_exit_code: int | None = placed("termination.trainer_exit_code", default=None)
    demo: bool = placed("criteria.demo", default=False)
    recipe: dict | None = None
    topology: dict | None = None
    timing: dict | None = None  # what was measured; the verdict adds what it derives (sections.DERIVED_TIMING)
    interconnect: dict | None = None  # the collective check before training (GPUs only)
    environment: dict | None = None  # software and per-node GPU inventory
    inputs: dict | None = None  # dataset and model identities, model shapes
    # each rank's forward time (bench/verdict/ranks.py); the verdict adds its summary
    rank_times: list[dict] | None = placed("ranks.per_rank", default=None)
    problems: list[dict] = field(default_factory=list)  # preflight refusals: status invalid


def verdict_path(context_field: dataclasses.Field) -> tuple[str, ...]:
    """Where a RunContext field stands in the verdict."""
    return context_field.metadata.get(_PLACE, (context_field.name,))


def to_json(context: RunContext) -> dict:
    """The context's fields, each at its place in the verdict (a dataclass as its fields)."""
    document: dict = {}
    for context_field in dataclasses.fields(RunContext):
        value = getattr(context, context_field.name)
        *sections, key = verdict_path(context_field)
        at = document
        for section in sections:
            at = at.setdefault(section, {})
        at[key] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return document


def from_json(verdict: dict) -> RunContext:
    """The context a verdict recorded: each field read from its place; a place an older
    verdict lacks gives the field's default."""
    types = typing.get_type_hints(RunContext)
    values = {}
    for context_field in dataclasses.fields(RunContext):
        value = verdict
        for key in verdict_path(context_field):
            value = value.get(key, _ABSENT) if isinstance(value, dict) else _ABSENT
        if value is _ABSENT:
            continue  # the default stands; a required field's absence fails in RunContext
        kind = types[context_field.name]
        values[context_field.name] = (
            kind(**{part.name: value[part.name] for part in dataclasses.fields(kind)})
            if dataclasses.is_dataclass(kind)
            else value
        )
    return RunContext(**values)
