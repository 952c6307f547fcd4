"""A refusal, as every check before training returns it: the path or variable at
fault, what is wrong with it and what to do. The checks collect them all rather than
stopping at the first; the verdict lists them, and the run exits 2 (invalid)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Problem:
    path: str
    problem: str
    fix: str

    def as_dict(self) -> dict:
        return asdict(self)
