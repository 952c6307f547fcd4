"""Live progress lines on the console while the trainer runs."""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console

from bench.verdict.metrics import MetricsRecord


@dataclass
class ProgressPrinter:
    """Prints step, loss, s/step and ETA for each logged interval. With accumulation a
    step logs several times: the micro-batch count says where in the step it is."""

    console: Console
    max_steps: int
    accumulative_counts: int = 1

    def __call__(self, record: MetricsRecord) -> None:
        step = record.step(self.accumulative_counts)
        parts = [f"step {step:>5}/{self.max_steps}"]
        if self.accumulative_counts > 1:
            parts[0] += f" (micro-batch {record.iter}/{self.max_steps * self.accumulative_counts})"
        parts.append(f"loss {record.loss:.4f}")
        if record.time:
            seconds_per_step = record.time * self.accumulative_counts
            remaining = max(self.max_steps - step, 0) * seconds_per_step
            minutes, seconds = divmod(int(remaining), 60)
            parts += [f"{seconds_per_step:.3f} s/step", f"ETA {minutes}m{seconds:02d}s"]
        self.console.print("  " + " | ".join(parts), highlight=False)
