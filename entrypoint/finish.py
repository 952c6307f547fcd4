"""The run's last stage, its verdict: node 0 writes verdict.json and report.md and tells
the other nodes the job's status; each other node writes node-<rank>.json. A stage
that ends the run early raises RunEnded with the context to judge, and the run goes
straight here: every end has its verdict."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from bench.core.layout import Layout
from bench.core.statuses import EXIT_CODES, Termination
from bench.verdict import document as verdict_mod
from bench.verdict.metrics import MetricsStream
from bench.verdict.report import write_report
from bench.verdict.run_context import RunContext
from entrypoint.job.agreement import share_status
from entrypoint.job.cluster import log_tails
from entrypoint.job.stage import Job
from entrypoint.launch.signals import Interrupted
from entrypoint.preflight.layout_checks import check_writable
from entrypoint.request import RunRequest, RunResult

NO_RECORDS = MetricsStream([], 0)


class RunEnded(Exception):
    """A stage ended the run before training: ``context`` says how."""

    def __init__(self, context: RunContext):
        super().__init__(context.termination.detail)
        self.context = context


def aborted(stop: Interrupted) -> Termination:
    return Termination("aborted", f"{stop.signal_name} received before training started; no trainer was launched")


def finish(job: Job, context: RunContext, stream: MetricsStream = NO_RECORDS) -> RunResult:
    """Node 0 writes the verdict and tells the others the job's status; they write
    node-<rank>.json. Where preflight found nowhere to write, the console has it all."""
    if not job.writable:
        invalid = verdict_mod.build(context, stream)
        return RunResult(invalid, None, invalid["exit_code"])
    folder, topology = job.folder, job.topology
    folder.path.mkdir(parents=True, exist_ok=True)
    if topology.node_rank == 0:
        result = _written(folder.path, verdict_mod.build(context, stream))
        share_status(topology, result.document["status"])
        return result
    local = verdict_mod.build(context, stream)
    job_status = share_status(topology, None)
    document = {
        "node_rank": topology.node_rank,
        "run_id": context.run_id,
        "status": job_status or "error",
        "reason": (
            f"node 0 reported the job's status: {job_status}"
            if job_status
            else "node 0 never reported the job's status"
        ),
        "exit_code": EXIT_CODES[job_status or "error"],
        "node_status": local["status"],
        "node_reason": local["reason"],
        "problems": context.problems,
        "termination": local["termination"],
        "fingerprint": asdict(job.fingerprint),
        "log_tails": log_tails(folder.logs),
    }
    path = folder.node_document
    verdict_mod.write_node_document(path, document)
    return RunResult(document, path, document["exit_code"])


def aborted_before_training(
    request: RunRequest, layout: Layout, results_parent: Path, stop: Interrupted, run_id: str
) -> RunResult:
    """A signal before the job was formed: a verdict in the folder this node proposed (an
    early trainer's logs may be there already), where it can be written."""
    context = RunContext(run_id=run_id, criteria=request.criteria, termination=aborted(stop), demo=request.demo)
    verdict = verdict_mod.build(context, NO_RECORDS)
    if check_writable(results_parent, layout) or (request.out is None and not layout.root.is_dir()):
        return RunResult(verdict, None, verdict["exit_code"])
    run_dir = results_parent / context.run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    return _written(run_dir, verdict)


def _written(run_dir: Path, verdict: dict) -> RunResult:
    """verdict.json and report.md in the run's folder."""
    path = verdict_mod.write(run_dir, verdict)
    write_report(run_dir, verdict)
    return RunResult(verdict, path, verdict["exit_code"])
