"""One benchmark run, the order of its stages: preflight, the job's agreement, the
collective check with the sizing and the first attempt written, training (with the one
memory retry), the verdict. Each stage is a module that returns what the next needs
(docs/ARCHITECTURE.md); this one only sequences them. A signal before training aborts
the run with a verdict (preflight of 558k records takes seconds; the agreement may
wait minutes); during training the supervisor stops the trainer, and what ran is judged.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

from rich.console import Console

from bench.core.layout import Layout
from entrypoint.finish import RunEnded, aborted_before_training, finish
from entrypoint.job.stage import form_job
from entrypoint.launch.before_training import ready_to_train
from entrypoint.launch.signals import AbortOnSignals, Interrupted, SignalFlag
from entrypoint.launch.training_stage import train
from entrypoint.preflight.stage import preflight
from entrypoint.request import RunRequest, RunResult, new_run_id


def execute(request: RunRequest, console: Console) -> RunResult:
    """One run to its verdict."""
    layout = Layout.at(request.root)
    results_parent = Path(request.out).absolute() if request.out else layout.results_dir
    run_id = new_run_id()  # this node's proposal: the folder of a verdict before the job is formed
    try:
        with AbortOnSignals() as before_training, ExitStack() as children:
            checked = preflight(request, layout, results_parent, children, run_id)
            job, context = form_job(request, checked, results_parent)
            before_training.check()  # a signal that code on the way swallowed
            if context.problems:
                return finish(job, context)
            try:
                ready = ready_to_train(request, checked, job, context, layout, console, before_training)
            except RunEnded as ended:
                return finish(job, ended.context)
            with SignalFlag() as after_training:  # from here on a signal no longer loses what ran
                return finish(job, *train(request, job, ready, layout, console, after_training))
    except Interrupted as stop:
        return aborted_before_training(request, layout, results_parent, stop, run_id)
