"""One benchmark run: preflight -> recipe -> launch/supervise -> metrics -> verdict.

Each step is a plain function over plain data; this module only wires them in the
one direction DESIGN §5 fixes, and decides where every file of the run goes.
"""
from __future__ import annotations

import secrets
import shutil
import time
from dataclasses import dataclass, replace
from datetime import datetime
from importlib import metadata
from pathlib import Path

from rich.console import Console

from bench import verdict as verdict_mod
from bench.criteria import Criteria, Termination
from bench.layout import Layout
from bench.metrics import MetricsRecord, MetricsStream, find_stream, is_finite, read_stream
from bench.recipe import RecipeOptions, RenderedRecipe, from_user_config, render
from entrypoint import __version__
from entrypoint.launch import free_port, plan_launch, supervise, utc_now
from entrypoint.preflight import Problem, check_layout, check_writable
from entrypoint.progress import ProgressPrinter


@dataclass(frozen=True)
class RunRequest:
    root: Path
    out: Path | None
    criteria: Criteria
    recipe: RecipeOptions
    device: str = "auto"  # auto | cuda | cpu
    global_batch: int | None = None
    demo: bool = False


@dataclass(frozen=True)
class RunResult:
    verdict: dict
    run_dir: Path | None  # None when nothing could be written


def new_run_id() -> str:
    return f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def detect_device(requested: str) -> tuple[str, int]:
    """(device, processes per node): one process per visible GPU, or one CPU process."""
    import torch

    gpus = torch.cuda.device_count()
    if requested == "cpu" or (requested == "auto" and gpus == 0):
        return "cpu", 1
    if gpus == 0:
        raise RuntimeError("--device cuda was asked for, but no CUDA GPU is visible")
    return "cuda", gpus


def xtuner_provenance() -> tuple[str, str | None]:
    """Installed XTuner version, and the git commit when pip recorded one (PEP 610)."""
    import json

    distribution = metadata.distribution("xtuner")
    direct_url = distribution.read_text("direct_url.json")
    commit = json.loads(direct_url).get("vcs_info", {}).get("commit_id") if direct_url else None
    return distribution.version, commit


def _batch_problems(request: RunRequest, world_size: int) -> tuple[int, list[Problem]]:
    """Accumulation that holds --global-batch on this many processes."""
    if request.global_batch is None:
        return request.recipe.accumulative_counts, []
    per_micro_step = request.recipe.per_device_batch * world_size
    if request.global_batch % per_micro_step:
        return 1, [
            Problem(
                "--global-batch",
                f"{request.global_batch} is not a multiple of per-device batch x processes "
                f"({request.recipe.per_device_batch} x {world_size} = {per_micro_step})",
                f"choose a multiple of {per_micro_step}",
            )
        ]
    return request.global_batch // per_micro_step, []


def _recipe_record(recipe: RenderedRecipe, options: RecipeOptions, world_size: int) -> dict:
    xtuner_version, xtuner_commit = xtuner_provenance()
    return {
        "source": recipe.source,
        "config_sha256": recipe.sha256,
        "appliance_version": __version__,
        "xtuner_version": xtuner_version,
        "xtuner_commit": xtuner_commit,
        "precision": "fp32" if options.device == "cpu" else options.precision,
        "device": options.device,
        "per_device_batch": options.per_device_batch,
        "accumulative_counts": options.accumulative_counts,
        "global_batch": options.per_device_batch * options.accumulative_counts * world_size,
        "max_iters": options.max_iters,
        "seed": options.seed,
        "dataloader_num_workers": options.dataloader_num_workers,
        "deviations": recipe.deviations,
        "cfg_options": recipe.cfg_options,
    }


def _stop_check(criteria: Criteria, printer: ProgressPrinter):
    def on_record(record: MetricsRecord) -> bool:
        printer(record)
        return criteria.stop_on_target and is_finite(record.loss) and record.loss < criteria.target_loss

    return on_record


def execute(request: RunRequest, console: Console) -> RunResult:
    layout = Layout.at(request.root)
    results_parent = Path(request.out).absolute() if request.out else layout.results_dir
    device, nproc = detect_device(request.device)
    accumulative_counts, problems = _batch_problems(request, nproc)
    options = replace(request.recipe, device=device, accumulative_counts=accumulative_counts)
    context = verdict_mod.RunContext(
        run_id=new_run_id(),
        criteria=request.criteria,
        termination=Termination("unknown"),
        accumulative_counts=options.accumulative_counts,
        per_device_batch=options.per_device_batch,
        world_size=nproc,
        demo=request.demo,
    )
    unwritable = check_writable(results_parent)
    problems = [*unwritable, *problems, *check_layout(layout)]
    if problems:
        invalid = verdict_mod.build(replace(context, problems=[p.as_dict() for p in problems]), MetricsStream([], 0))
        if unwritable:  # nowhere to write it: the console gets it all
            return RunResult(invalid, None)
        run_dir = results_parent / context.run_id
        run_dir.mkdir(parents=True)
        verdict_mod.write(run_dir, invalid)
        return RunResult(invalid, run_dir)
    run_dir = results_parent / context.run_id
    run_dir.mkdir(parents=True)

    recipe = (
        from_user_config(layout.config_override, options)
        if layout.config_override.is_file()
        else render(layout, options, __version__)
    )
    config_path = run_dir / "config.py"
    config_path.write_text(recipe.text)
    work_dir = run_dir / "xtuner"
    port = free_port()
    plan = plan_launch(
        config_path, work_dir, run_dir / "logs", layout.root, device, nproc, port, recipe.cfg_options
    )
    console.print(
        f"[bold]llava-bench[/] run {context.run_id}: {nproc} x {device}, "
        f"{options.max_steps} steps, target loss < {request.criteria.target_loss}"
    )
    console.print(f"  results: {run_dir}", highlight=False)
    started_at, started = utc_now(), time.monotonic()
    printer = ProgressPrinter(console, options.max_steps, options.accumulative_counts)
    outcome = supervise(plan, work_dir, _stop_check(request.criteria, printer))
    wall_seconds = time.monotonic() - started

    stream_path = find_stream(work_dir)
    metrics_copy = run_dir / verdict_mod.METRICS_NAME
    if stream_path is not None:
        shutil.copyfile(stream_path, metrics_copy)
    else:
        metrics_copy.write_text("")
    context = replace(
        context,
        termination=outcome.termination,
        trainer_exit_code=outcome.exit_code,
        recipe=_recipe_record(recipe, options, nproc),
        topology={
            "nnodes": 1,
            "node_rank": 0,
            "nproc_per_node": nproc,
            "master_addr": "127.0.0.1",
            "master_port": port if plan.distributed else None,
            "source": "single node: one process per visible GPU" if plan.distributed else "single node: one CPU process",
            "launch_command": plan.argv,
        },
        timing={
            "started_at": started_at,
            "first_record_at": outcome.first_record_at,
            "ended_at": outcome.ended_at,
            "wall_seconds": round(wall_seconds, 3),
        },
    )
    final = verdict_mod.build(context, read_stream(metrics_copy))
    verdict_mod.write(run_dir, final)
    return RunResult(final, run_dir)

