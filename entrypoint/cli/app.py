"""The ``llava-bench`` command line.

Exit codes (README, "Exit codes"): 0 pass, 1 fail, 2 invalid, 3 error or aborted. Human output
goes to the console; ``--json`` prints one JSON document for machines instead.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer

from bench.core.layout import Layout
from bench.core.statuses import EXIT_CODES, Criteria, Watchdog
from bench.core.trainer_files import COMPARED_STEPS
from bench.recipe.levers import LeverRequest
from bench.recipe.render import STOCK_PER_DEVICE_BATCH, RecipeOptions
from bench.synth.spec import DEMO_CRITERIA, DEMO_PER_DEVICE_BATCH, DEMO_SAMPLES, REAL_SHAPE_SPEC, SynthSpec
from entrypoint import __version__
from entrypoint.cli import cluster as cli_cluster
from entrypoint.cli import layout as cli_layout
from entrypoint.cli import results as cli_results
from entrypoint.cli.layout import write_synthetic
from entrypoint.cli.options import (
    Device,
    JsonOption,
    JunitOption,
    NprocOption,
    Precision,
    RootOption,
    Variant,
    WorldSizeOption,
    a_loss_target,
    console,
    errors,
    with_lever_options,
)
from entrypoint.cli.results import run_to_verdict
from entrypoint.tools.perf import DEFAULT_VARIANTS

app = typer.Typer(
    help="llava-bench: pretrain LLaVA-InternLM2-20B with XTuner + DeepSpeed ZeRO-2 and write a verdict.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version_callback(value: bool):
    if value:
        console.print(f"llava-bench {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", metavar="", callback=_version_callback, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
):
    """Benchmark appliance: validate a layout, run the pretraining, judge the loss curve."""


# The commands in the order --help lists them; those of other modules are registered here.
app.command()(cli_layout.synth)
app.command()(cli_layout.prepare)
app.command()(cli_layout.validate)


@app.command()
@with_lever_options
def run(
    root: RootOption = Path("/llava"),
    out: Annotated[Optional[Path], typer.Option(help="Folder for results/<run_id>/ (default: <root>/results).")] = None,
    max_steps: Annotated[
        int,
        typer.Option(
            min=1,
            help="Optimizer steps within which the loss must fall below target; at most the LR "
            "schedule's length (the pinned recipe's one epoch of the dataset).",
        ),
    ] = Criteria.max_steps,
    target_loss: Annotated[
        float,
        typer.Option(callback=a_loss_target, help="The logged loss must fall strictly below this (finite, above 0)."),
    ] = Criteria.target_loss,
    precision: Annotated[
        Optional[Precision],
        typer.Option(help="LLM weights: nf4 (the pinned recipe, the default) or bf16; a user's config keeps its own."),
    ] = None,
    per_device_batch: Annotated[
        Optional[int],
        typer.Option(
            min=1,
            help=f"Samples per GPU per micro-iteration (default {STOCK_PER_DEVICE_BATCH}, or a user's config's own).",
        ),
    ] = None,
    global_batch: Annotated[
        Optional[int],
        typer.Option(
            min=1,
            help="Samples per optimizer step, held with gradient accumulation (default on GPUs: 1024, the reference "
            "run's "
            "4 x 8 GPUs x 32, the one the target is stated for; CPU: one micro-batch).",
        ),
    ] = None,
    seed: Annotated[
        int, typer.Option(min=0, max=2**32 - 1, help="Random seed (0 to 2^32-1), recorded in the verdict.")
    ] = RecipeOptions.seed,
    device: Annotated[Device, typer.Option(help="auto: every visible GPU, else one CPU process.")] = Device.auto,
    stop_on_target: Annotated[
        bool, typer.Option(metavar="", help="End training at the first loss below target (MLPerf style).")
    ] = False,
    save_checkpoint: Annotated[
        bool, typer.Option(metavar="", help="Save checkpoints every 500 steps (2 kept).")
    ] = False,
    eval_image: Annotated[
        Optional[Path],
        typer.Option(
            exists=True,
            dir_okay=False,
            readable=True,
            help="Local image for XTuner's EvaluateChatHook; without it the hook is off.",
        ),
    ] = None,
    stock: Annotated[
        bool,
        typer.Option(metavar="", help="The pinned XTuner recipe exactly: every speed lever off (docs/PERFORMANCE.md)."),
    ] = False,
    levers: LeverRequest = None,  # one option per lever here (with_lever_options)
    save_projector: Annotated[
        bool,
        typer.Option(
            metavar="",
            help="Save the projector's first gradient and its weights before training and after step "
            f"{COMPARED_STEPS} under xtuner/ (llava-bench perf compares them).",
        ),
    ] = False,
    profile: Annotated[
        bool,
        typer.Option(
            metavar="",
            help="Profile two steady steps on rank 0 with torch.profiler (GPUs): kernel time by kind in "
            "xtuner/profile.json and a Chrome trace beside it (llava-bench perf --profile reads them).",
        ),
    ] = False,
    float32_reference: Annotated[
        bool,
        typer.Option(
            metavar="",
            help="Stock's recipe with every float in float32 (no fp16, bf16 or TF32; implies --stock): the exact math "
            "llava-bench perf holds gradients against. GPUs; not a benchmark run.",
        ),
    ] = False,
    world_size_means: WorldSizeOption = None,
    nproc_per_node: NprocOption = None,
    image_sample: Annotated[
        int, typer.Option(min=0, help="Images decoded before training (a seeded sample); 0: every image.")
    ] = 1000,
    startup_timeout: Annotated[
        float,
        typer.Option(min=1, help="Seconds from launch to the first training step before the run counts as stalled."),
    ] = Watchdog.startup_seconds,
    stall_timeout: Annotated[
        float,
        typer.Option(min=1, help="Seconds without new metrics, once training runs, before the run counts as stalled."),
    ] = Watchdog.stall_seconds,
    junit: JunitOption = None,
    as_json: JsonOption = False,
):
    """Validate, train with XTuner, and write results/<run_id>/verdict.json (node-<rank>.json on other nodes)."""
    from entrypoint.request import RunRequest

    request = RunRequest(
        root=root,
        out=out,
        criteria=Criteria(target_loss=target_loss, max_steps=max_steps, stop_on_target=stop_on_target),
        recipe=RecipeOptions(
            max_steps=max_steps,
            precision=(precision or Precision.nf4).value,
            per_device_batch=per_device_batch or STOCK_PER_DEVICE_BATCH,
            seed=seed,
            save_checkpoint=save_checkpoint,
            eval_image=eval_image,
            save_projector=save_projector,
            profile=profile,
            float32_reference=float32_reference,
        ),
        levers=replace(levers, stock=stock or float32_reference),
        device=device.value,
        global_batch=global_batch,
        world_size_means=world_size_means.value if world_size_means else None,
        nproc_per_node=nproc_per_node,
        image_sample=image_sample or None,
        watchdog=Watchdog(startup_seconds=startup_timeout, stall_seconds=stall_timeout),
        asked=frozenset(
            name
            for name, value in (("precision", precision), ("per_device_batch", per_device_batch))
            if value is not None
        ),
    )
    run_to_verdict(request, as_json, junit)


app.command()(cli_cluster.topology)
app.command("check-cluster")(cli_cluster.check_cluster_command)
app.command()(cli_results.verdict)
app.command()(cli_results.report)


@app.command()
def demo(
    root: Annotated[
        Path,
        typer.Option(
            "--root", help="The layout to run on (data/, model/, results/); a synthetic one is written where none is."
        ),
    ] = Path("demo"),
    device: Annotated[Device, typer.Option(help="auto: every visible GPU, else one CPU process.")] = Device.auto,
    as_json: JsonOption = False,
):
    """synth + run on whatever is here (CPU is fine), with demo criteria stated in the verdict."""
    from entrypoint.request import RunRequest

    layout = Layout.at(root)
    started = time.monotonic()
    if not layout.dataset_json.exists():
        (console if not as_json else errors).print(f"writing the synthetic layout to {layout.root}", highlight=False)
        write_synthetic(layout.root, SynthSpec(samples=DEMO_SAMPLES))
    request = RunRequest(
        root=layout.root,
        out=None,
        criteria=DEMO_CRITERIA,
        recipe=RecipeOptions(max_steps=DEMO_CRITERIA.max_steps, per_device_batch=DEMO_PER_DEVICE_BATCH),
        device=device.value,
        demo=True,
        setup_seconds=time.monotonic() - started,
    )
    run_to_verdict(request, as_json)


@app.command()
def perf(
    root: Annotated[
        Path,
        typer.Option(
            "--root", help="Layout to measure on; an empty folder gets random weights of the real shapes (GPU, 39 GB)."
        ),
    ] = Path("perf-layout"),
    out: Annotated[Path, typer.Option(help="Folder for each variant's results and perf.json.")] = Path("perf-results"),
    variant: Annotated[
        Optional[list[Variant]],
        typer.Option(
            help=f"Recipe variants to run, in order (repeatable; default: {', '.join(DEFAULT_VARIANTS)}); see "
            "docs/PERFORMANCE.md."
        ),
    ] = None,
    steps: Annotated[
        int, typer.Option(min=20, help="Optimizer steps per variant (the first logged interval is warm-up).")
    ] = 30,
    precision: Annotated[Precision, typer.Option(help="LLM weights: nf4 (the pinned recipe) or bf16.")] = Precision.nf4,
    per_device_batch: Annotated[int, typer.Option(min=1, help="Samples per GPU per micro-iteration.")] = 32,
    samples: Annotated[
        int, typer.Option(min=512, help="Images of a layout written here (the records reuse them in turn).")
    ] = REAL_SHAPE_SPEC.samples,
    records: Annotated[
        Optional[int],
        typer.Option(
            min=512,
            help="JSON records of a layout written here (558128: LLaVA-Pretrain's count, to time start-up); "
            "default: 545 steps an epoch at this batch on these GPUs, the reference run's LR schedule per step.",
        ),
    ] = None,
    caption_scale: Annotated[
        int,
        typer.Option(
            min=1,
            max=9,
            help="Captions of a layout written here, in multiples of LLaVA-Pretrain's text (3: the memory model's "
            "edge, about 147 padded text tokens a sample).",
        ),
    ] = 1,
    models_from: Annotated[
        Optional[Path],
        typer.Option(help="Hard-link the model folders of another layout perf wrote instead of writing them (no GPU)."),
    ] = None,
    device: Annotated[
        Device, typer.Option(help="auto: every visible GPU, else one CPU process (for trying the command).")
    ] = Device.auto,
    profile: Annotated[
        bool,
        typer.Option(
            metavar="",
            help="Profile each variant's steps 6-7 with torch.profiler (GPUs; before the timed steps): the share of "
            "each kind of GPU work, of the recompute and of idle time, in a second table and perf.json.",
        ),
    ] = False,
    as_json: JsonOption = False,
):
    """Stock XTuner and the appliance's speed levers back to back on the same GPUs: one table."""
    from dataclasses import asdict

    from bench.verdict.perf_compare import table
    from entrypoint.tools.perf import PerfInvalid, measure

    chosen = [v.value for v in variant] if variant else list(DEFAULT_VARIANTS)
    try:
        rows, projectors, report = measure(
            root,
            out,
            chosen,
            steps,
            precision.value,
            per_device_batch,
            samples,
            records,
            device.value,
            errors,
            caption_scale,
            models_from,
            profile,
        )
    except PerfInvalid as invalid:
        errors.print(f"[red]invalid:[/] {invalid}", highlight=False)
        raise typer.Exit(EXIT_CODES["invalid"]) from None
    if as_json:
        console.print_json(json.dumps([asdict(row) for row in rows]))
    else:
        console.print(table(rows), highlight=False)
        if projectors.movement is not None:
            console.print(
                f"the projector is compared with {projectors.reference}'s: in {COMPARED_STEPS} steps it moved "
                f"{projectors.movement:.2e} of its initial norm, and distances are relative to that move",
                highlight=False,
            )
        console.print(f"written: {report}", highlight=False)
    if any(row.termination != "completed" or False in (row.gradient_agrees, row.projector_agrees) for row in rows):
        raise typer.Exit(1)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
