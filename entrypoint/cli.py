"""The ``llava-bench`` command line.

Exit codes (DESIGN §1): 0 pass, 1 fail, 2 invalid, 3 error or aborted. Human output
goes to the console; ``--json`` prints one JSON document for machines instead.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import sys
from dataclasses import fields, replace
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from bench import verdict as verdict_mod
from bench.criteria import EXIT_CODES, Criteria
from bench.layout import Layout
from bench.levers import LEVER_HELP, STOCK, LeverRequest, Levers
from bench.recipe import STOCK_PER_DEVICE_BATCH, RecipeOptions
from bench.synth import DEMO_CRITERIA, DEMO_PER_DEVICE_BATCH, DEMO_SAMPLES, REAL_SHAPE_SPEC, SynthSpec
from bench.trainer import COMPARED_STEPS
from entrypoint import __version__
from entrypoint.perf import VARIANTS
from entrypoint.preflight import check_layout

app = typer.Typer(
    help="llava-bench: pretrain LLaVA-InternLM2-20B with XTuner + DeepSpeed ZeRO-2 and write a verdict.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# soft_wrap: never break a long path in the middle; users copy them.
console = Console(soft_wrap=True)
errors = Console(stderr=True, soft_wrap=True)


class Precision(str, Enum):
    nf4 = "nf4"
    bf16 = "bf16"


class WorldSizeMeans(str, Enum):
    nodes = "nodes"
    processes = "processes"


# `llava-bench perf` variants (entrypoint/perf.py VARIANTS).
Variant = Enum("Variant", {name: name for name in VARIANTS}, type=str)


class Device(str, Enum):
    auto = "auto"
    cuda = "cuda"
    cpu = "cpu"


RootOption = Annotated[Path, typer.Option("--root", help="The mounted layout (data/, model/, results/).")]
JsonOption = Annotated[bool, typer.Option("--json", metavar="", help="Print one JSON document instead of text.")]
WorldSizeOption = Annotated[
    Optional[WorldSizeMeans],
    typer.Option(help="How to read WORLD_SIZE when nothing else says: nodes (the seed's convention) or processes."),
]


def _a_writable_file(path: Path | None) -> Path | None:
    """An output file whose folder exists and can be written, checked before any work."""
    if path is not None:
        folder = path.absolute().parent
        if path.is_dir() or not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
            raise typer.BadParameter(
                f"{path}: {'a folder' if path.is_dir() else f'{folder} is not a writable folder'}; name a file in one"
            )
    return path


JunitOption = Annotated[
    Optional[Path], typer.Option(callback=_a_writable_file, help="Also write the verdict as JUnit XML to this file.")
]
NprocOption = Annotated[Optional[int], typer.Option(min=1, help="Processes per node (default: visible GPUs).")]


def _a_loss_target(value: float | None) -> float | None:
    """A target the loss can fall below: finite and above 0 (checked before any work)."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise typer.BadParameter(f"{value} is not a loss a run can fall below: give a finite number above 0")
    return value


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


@app.command()
def synth(
    directory: Annotated[Path, typer.Argument(help="Empty or new folder to write the synthetic layout into.")],
    samples: Annotated[
        int, typer.Option(min=512, help="Image-caption records (enough for XTuner's 3 % warm-up to span an iteration).")
    ] = DEMO_SAMPLES,
    seed: Annotated[int, typer.Option(help="Seed; the same seed writes the same layout.")] = 0,
):
    """Write a tiny synthetic layout with the real folder structure (random tiny models)."""
    layout = _write_synthetic(directory, SynthSpec(samples=samples, seed=seed))
    console.print(f"synthetic layout with {samples} samples written to {layout.root}", highlight=False)


def _write_synthetic(folder: Path, spec: SynthSpec) -> Layout:
    """The synthetic layout, or exit 2 naming the folder that cannot take it."""
    from bench.synth import write_synthetic_layout

    try:
        return write_synthetic_layout(folder, spec)
    except FileExistsError as error:
        errors.print(f"[red]invalid:[/] {error}")
    except OSError as error:
        errors.print(
            f"[red]invalid:[/] the synthetic layout cannot be written to {folder} ({error}); choose a writable folder"
        )
    raise typer.Exit(EXIT_CODES["invalid"])


class Part(str, Enum):
    models = "models"
    dataset = "dataset"


@app.command()
def prepare(
    root: Annotated[
        Path,
        typer.Option(
            "--root", help="Where to lay out data/ and model/ (created if missing), as the other commands read it."
        ),
    ] = Path("/llava"),
    only: Annotated[Optional[Part], typer.Option(help="Only the models or only the dataset.")] = None,
    revision: Annotated[
        Optional[list[str]],
        typer.Option(help="Pin a repo: REPO=REVISION (e.g. internlm/internlm2-chat-20b=<commit>); repeatable."),
    ] = None,
):
    """Download the models and LLaVA-Pretrain from the hub (HF_ENDPOINT, HF_TOKEN honoured), unpack, validate."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

    from entrypoint.prepare import PrepareError
    from entrypoint.prepare import prepare as prepare_layout

    pins = {}
    for pin in revision or []:
        repo, separator, rev = pin.partition("=")
        if not separator or not rev:
            errors.print(f"[red]invalid:[/] --revision {pin!r}: write REPO=REVISION")
            raise typer.Exit(EXIT_CODES["invalid"])
        pins[repo] = rev
    with Progress(
        "unpacking images.zip", BarColumn(), DownloadColumn(), TimeRemainingColumn(), console=errors, transient=True
    ) as bar:
        task = bar.add_task("unpack", total=None)
        try:
            done = prepare_layout(
                root,
                only.value if only else None,
                pins,
                say=lambda line: console.print(line, highlight=False),
                progress=lambda completed, total: bar.update(task, completed=completed, total=total),
            )
        except PrepareError as error:
            errors.print(f"[red]prepare stopped:[/] {error}", highlight=False)
            raise typer.Exit(EXIT_CODES["invalid"]) from None
    for line in done:
        console.print(f"  done: {line}", highlight=False)
    problems = check_layout(Layout.at(root))
    for problem in problems:
        errors.print(f"  left: {problem.path}: {problem.problem}\n    fix: {problem.fix}", highlight=False)
    if not problems:
        console.print(f"[green]valid layout[/] {Layout.at(root).root}", highlight=False)
    raise typer.Exit(EXIT_CODES["invalid"] if problems else 0)


@app.command()
def validate(
    root: RootOption = Path("/llava"),
    out: Annotated[
        Optional[Path],
        typer.Option(help="Where run will write results (default: <root>/results): checked for writing."),
    ] = None,
    deep: Annotated[
        bool,
        typer.Option(
            metavar="",
            help="Also check every record, decode every image, check model indexes and shapes, import the LLM's code.",
        ),
    ] = False,
    sample: Annotated[
        Optional[int], typer.Option(min=1, help="With --deep: decode only this many images (a seeded sample).")
    ] = None,
    as_json: JsonOption = False,
):
    """Check the layout before any model is loaded (seconds; --deep: minutes); list every problem."""
    from entrypoint.preflight import check_writable

    layout = Layout.at(root)
    problems = check_layout(layout)
    if layout.root.is_dir():
        problems += check_writable(out.absolute() if out else layout.results_dir, layout)
    if deep and not problems:
        problems = _deep_with_progress(layout, sample)
    if as_json:
        print(
            json.dumps(
                {"root": str(layout.root), "valid": not problems, "problems": [p.as_dict() for p in problems]}, indent=2
            )
        )
    elif problems:
        errors.print(f"[red]invalid layout[/] {layout.root}: {len(problems)} problem(s)", highlight=False)
        for problem in problems:
            errors.print(f"  - {problem.path}: {problem.problem}\n    fix: {problem.fix}", highlight=False)
    else:
        console.print(f"[green]valid layout[/] {layout.root}", highlight=False)
    raise typer.Exit(EXIT_CODES["invalid"] if problems else 0)


def _deep_with_progress(layout: Layout, sample: int | None):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from bench.inputs import load_dataset
    from entrypoint.deep import deep_problems
    from entrypoint.model_code import ModelCodeProbe

    with Progress(
        "decoding images", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=errors, transient=True
    ) as bar:
        task = bar.add_task("decode", total=None)
        dataset = load_dataset(layout.dataset_json)
        with ModelCodeProbe(layout.llm_dir) as probe:
            problems = deep_problems(
                layout, dataset, sample, progress=lambda done, total: bar.update(task, completed=done, total=total)
            )
            return problems + probe.result().problems


def _report(verdict: dict, path: Path | None, as_json: bool) -> None:
    if as_json:
        print(verdict_mod.dumps(verdict), end="")
        return
    colour = {"pass": "green", "fail": "red"}.get(verdict["status"], "yellow")
    console.print(f"[bold {colour}]{verdict['status'].upper()}[/]: {verdict['reason']}", highlight=False)
    for problem in verdict["problems"]:
        errors.print(f"  - {problem['path']}: {problem['problem']}\n    fix: {problem['fix']}", highlight=False)
    speed = (verdict.get("throughput") or {}).get("seconds_per_step") or {}
    if speed.get("median") is not None:
        console.print(f"  {speed['median']:.3f} s/step (median of the steady window)", highlight=False)
    if path is not None:
        console.print(f"  written: {path}", highlight=False)


def _write_junit(verdict: dict, path: Path) -> None:
    """The JUnit file; a failure to write it is one line and exit 3 (the verdict stands)."""
    from bench.report import write_junit

    try:
        write_junit(verdict, path)
    except OSError as error:
        errors.print(f"[red]error:[/] --junit {path}: {error.strerror or error}", highlight=False)
        raise typer.Exit(EXIT_CODES["error"]) from None


def _run(request, as_json: bool, junit: Path | None = None) -> None:
    from entrypoint.pipeline import execute

    try:
        result = execute(request, errors if as_json else console)
    except RuntimeError as error:  # e.g. --device cuda without GPUs
        errors.print(f"[red]invalid:[/] {error}")
        raise typer.Exit(EXIT_CODES["invalid"]) from None
    except OSError as error:  # not even the verdict could be written (a full or vanished filesystem)
        where = f" at {error.filename}" if error.filename else ""
        errors.print(
            f"[red]error:[/] the results could not be written{where}: {error.strerror or error}", highlight=False
        )
        raise typer.Exit(EXIT_CODES["error"]) from None
    _report(result.document, result.path, as_json)
    if junit is not None:
        _write_junit(result.document, junit)
    if result.document["status"] == "aborted":
        # A signal can stop a library mid-operation (a process pool, a lock) and leave the
        # interpreter's shutdown waiting on it forever; the verdict is written: end now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(result.exit_code)
    raise typer.Exit(result.exit_code)


def _with_lever_options(command):
    """``command`` with one option per lever (bench.levers.LEVER_HELP) where its
    ``levers`` parameter stands, handed to it as one LeverRequest: a new lever needs
    no edit here."""
    signature = inspect.signature(command, eval_str=True)
    parameters = list(signature.parameters.values())
    switches = {lever.name: isinstance(getattr(STOCK, lever.name), bool) for lever in fields(Levers)}
    at = [parameter.name for parameter in parameters].index("levers")
    parameters[at : at + 1] = [
        inspect.Parameter(
            name,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            default=None,
            annotation=Annotated[
                Optional[bool if switch else int],
                typer.Option(metavar="", help=LEVER_HELP[name])
                if switch
                else typer.Option(min=0, help=LEVER_HELP[name]),
            ],
        )
        for name, switch in switches.items()
    ]

    def with_levers(**arguments):
        return command(levers=LeverRequest(**{name: arguments.pop(name) for name in switches}), **arguments)

    with_levers.__signature__ = signature.replace(parameters=parameters)
    with_levers.__name__, with_levers.__doc__ = command.__name__, command.__doc__
    return with_levers


@app.command()
@_with_lever_options
def run(
    root: RootOption = Path("/llava"),
    out: Annotated[Optional[Path], typer.Option(help="Folder for results/<run_id>/ (default: <root>/results).")] = None,
    max_steps: Annotated[
        int, typer.Option(min=1, help="Optimizer steps within which the loss must fall below target.")
    ] = 500,
    target_loss: Annotated[
        float,
        typer.Option(callback=_a_loss_target, help="The logged loss must fall strictly below this (finite, above 0)."),
    ] = 2.3,
    precision: Annotated[
        Optional[Precision],
        typer.Option(help="LLM weights: nf4 (the pinned recipe, the default) or bf16; a user's config keeps its own."),
    ] = None,
    per_device_batch: Annotated[
        Optional[int],
        typer.Option(min=1, help="Samples per GPU per micro-iteration (default 32, or a user's config's own)."),
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
    seed: Annotated[int, typer.Option(help="Random seed, recorded in the verdict.")] = 42,
    device: Annotated[Device, typer.Option(help="auto: every visible GPU, else one CPU process.")] = Device.auto,
    stop_on_target: Annotated[
        bool, typer.Option(metavar="", help="End training at the first loss below target (MLPerf style).")
    ] = False,
    save_checkpoint: Annotated[
        bool, typer.Option(metavar="", help="Save checkpoints every 500 steps (2 kept).")
    ] = False,
    eval_image: Annotated[
        Optional[Path], typer.Option(help="Local image for XTuner's EvaluateChatHook; without it the hook is off.")
    ] = None,
    stock: Annotated[
        bool,
        typer.Option(metavar="", help="The pinned XTuner recipe exactly: every speed lever off (docs/PERFORMANCE.md)."),
    ] = False,
    levers: LeverRequest = None,  # one option per lever here (_with_lever_options)
    save_projector: Annotated[
        bool,
        typer.Option(
            metavar="",
            help="Save the projector's first gradient and its weights before training and after step "
            f"{COMPARED_STEPS} under xtuner/ (llava-bench perf compares them).",
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
    ] = 3600,
    stall_timeout: Annotated[
        float,
        typer.Option(min=1, help="Seconds without new metrics, once training runs, before the run counts as stalled."),
    ] = 1800,
    junit: JunitOption = None,
    as_json: JsonOption = False,
):
    """Validate, train with XTuner, and write results/<run_id>/verdict.json (node-<rank>.json on other nodes)."""
    from entrypoint.launch import Watchdog
    from entrypoint.pipeline import RunRequest

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
    _run(request, as_json, junit)


@app.command()
def topology(
    world_size_means: WorldSizeOption = None,
    nproc_per_node: NprocOption = None,
    as_json: JsonOption = False,
):
    """Show how this node reads the scheduler's environment, and the command `run` launches with it."""
    from entrypoint.launch import training_plan
    from entrypoint.pipeline import RunRequest, gpu_inventory, resolve_device, run_topology

    gpus = gpu_inventory()[0]
    device = resolve_device("auto", gpus)
    request = RunRequest(
        root=Path("/llava"),
        out=None,
        criteria=Criteria(),
        recipe=RecipeOptions(),
        world_size_means=world_size_means.value if world_size_means else None,
        nproc_per_node=nproc_per_node,
    )
    decision, problems = run_topology(request, device, gpus)
    if problems:
        errors.print(f"[red]refused:[/] {problems[0].problem}; fix: {problems[0].fix}", highlight=False)
        raise typer.Exit(EXIT_CODES["invalid"])
    results = Path("<results>/<run_id>")
    try:
        command = training_plan(
            results / "config.py", results / "xtuner", results / "logs", Path("/llava"), device, decision
        ).argv
    except FileNotFoundError as error:  # XTuner is not installed here
        errors.print(f"[red]refused:[/] {error}", highlight=False)
        raise typer.Exit(EXIT_CODES["invalid"]) from None
    if as_json:
        print(json.dumps({**decision.as_dict(), "launch_command": command}, indent=2))
        return
    console.print(
        f"[bold]{decision.source}[/]: node {decision.node_rank} of {decision.nnodes}, "
        f"{decision.nproc_per_node} process(es) per node, world size {decision.world_size}",
        highlight=False,
    )
    for name, origin in decision.origins.items():
        console.print(f"  {name:<15} {getattr(decision, name)!s:<20} from {origin}", highlight=False)
    if decision.world_size_reading:
        console.print(f"  WORLD_SIZE read as {decision.world_size_reading}", highlight=False)
    console.print("  launch: " + " ".join(command), highlight=False)


@app.command("check-cluster")
def check_cluster_command(
    root: RootOption = Path("/llava"),
    device: Annotated[
        Device, typer.Option(help="auto: every visible GPU, else CPU processes with gloo.")
    ] = Device.auto,
    world_size_means: WorldSizeOption = None,
    nproc_per_node: NprocOption = None,
    as_json: JsonOption = False,
):
    """Rendezvous with every node without training: same fingerprints, one collective over all processes."""
    from entrypoint.pipeline import RunRequest, check_cluster

    request = RunRequest(
        root=root,
        out=None,
        criteria=Criteria(),
        recipe=RecipeOptions(),
        device=device.value,
        world_size_means=world_size_means.value if world_size_means else None,
        nproc_per_node=nproc_per_node,
    )
    report, exit_code = check_cluster(request)
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        (console if exit_code == 0 else errors).print(f"{report['status']}: {report['reason']}", highlight=False)
        allreduce = (report.get("interconnect") or {}).get("allreduce")
        if allreduce:
            console.print(f"  all-reduce bus bandwidth {allreduce['bus_bandwidth_gbps']:.1f} GB/s", highlight=False)
    raise typer.Exit(exit_code)


def _stored_verdict(run_dir: Path) -> dict:
    """A results folder's verdict.json, schema-checked; exit 2 naming the file if it is
    missing, does not parse or is not a verdict of this schema."""
    import jsonschema

    stored = run_dir / verdict_mod.VERDICT_NAME
    if not stored.is_file():
        errors.print(
            f"[red]invalid:[/] {run_dir} holds no {verdict_mod.VERDICT_NAME}; is it a results/<run_id> folder?"
        )
        raise typer.Exit(EXIT_CODES["invalid"])
    try:
        document = json.loads(stored.read_text())
        verdict_mod.validate(document)
    except (OSError, ValueError, jsonschema.ValidationError) as error:
        why = error.message if isinstance(error, jsonschema.ValidationError) else str(error)
        errors.print(f"[red]invalid:[/] {stored} is not a readable verdict ({why}); run `llava-bench run` again")
        raise typer.Exit(EXIT_CODES["invalid"]) from None
    return document


@app.command()
def verdict(
    path: Annotated[Path, typer.Argument(help="A results/<run_id> folder, or a bare metrics stream (.json/.jsonl).")],
    max_steps: Annotated[
        Optional[int], typer.Option(min=1, help="Override the recorded max_steps (default 500 for a bare stream).")
    ] = None,
    target_loss: Annotated[
        Optional[float],
        typer.Option(
            callback=_a_loss_target, help="Override the recorded target loss (default 2.3 for a bare stream)."
        ),
    ] = None,
    accumulative_counts: Annotated[int, typer.Option(min=1, help="Micro-iterations per step, for a bare stream.")] = 1,
    junit: JunitOption = None,
    as_json: JsonOption = False,
):
    """Recompute the verdict offline from a results folder or a metrics stream."""
    if not path.exists():
        errors.print(f"[red]invalid:[/] {path} does not exist; give a results/<run_id> folder or a metrics stream")
        raise typer.Exit(EXIT_CODES["invalid"])
    if path.is_dir():
        stored = _stored_verdict(path)["criteria"]
        criteria = Criteria(
            target_loss=stored["target_loss"] if target_loss is None else target_loss,
            max_steps=stored["max_steps"] if max_steps is None else max_steps,
            stop_on_target=stored["stop_on_target"],
        )
        result = verdict_mod.recompute(path, criteria)
    else:
        from bench.metrics import read_stream

        try:
            records = read_stream(path).records
        except OSError as error:
            records, problem = [], f"cannot be read ({error})"
        else:
            problem = "holds no training record (a JSON line with iter and loss)"
        if not records:
            errors.print(
                f"[red]invalid:[/] {path} {problem}; give a results/<run_id> folder or XTuner's metrics stream"
            )
            raise typer.Exit(EXIT_CODES["invalid"])
        criteria = Criteria(
            target_loss=2.3 if target_loss is None else target_loss,
            max_steps=500 if max_steps is None else max_steps,
        )
        result = verdict_mod.from_stream(path, criteria, accumulative_counts)
    verdict_mod.validate(result)
    _report(result, None, as_json)
    if junit is not None:
        _write_junit(result, junit)
    raise typer.Exit(result["exit_code"])


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="A results/<run_id> folder holding verdict.json.")]):
    """(Re)draw report.md and loss.png of a results folder from its verdict."""
    from bench.report import write_report

    stored = _stored_verdict(run_dir)
    try:
        path = write_report(run_dir, stored)
    except OSError as error:
        errors.print(f"[red]error:[/] the report could not be written in {run_dir} ({error})")
        raise typer.Exit(EXIT_CODES["error"]) from None
    console.print(f"written: {path} and {run_dir / 'loss.png'}", highlight=False)


@app.command()
def demo(
    root: Annotated[
        Path, typer.Option("--root", help="Folder for the synthetic layout (llava/) and its results.")
    ] = Path("demo"),
    device: Annotated[Device, typer.Option(help="auto: every visible GPU, else one CPU process.")] = Device.auto,
    as_json: JsonOption = False,
):
    """synth + run on whatever is here (CPU is fine), with demo criteria stated in the verdict."""
    from entrypoint.pipeline import RunRequest

    layout = Layout.at(root / "llava")
    if not layout.dataset_json.exists():
        (console if not as_json else errors).print(f"writing the synthetic layout to {layout.root}", highlight=False)
        _write_synthetic(layout.root, SynthSpec(samples=DEMO_SAMPLES))
    request = RunRequest(
        root=layout.root,
        out=None,
        criteria=DEMO_CRITERIA,
        recipe=RecipeOptions(max_steps=DEMO_CRITERIA.max_steps, per_device_batch=DEMO_PER_DEVICE_BATCH),
        device=device.value,
        demo=True,
    )
    _run(request, as_json)


@app.command()
def perf(
    root: Annotated[
        Path,
        typer.Option(
            "--root", help="Layout to measure on; an empty folder gets random weights of the real shapes (GPU, ~45 GB)."
        ),
    ] = Path("perf-layout"),
    out: Annotated[Path, typer.Option(help="Folder for each variant's results and perf.json.")] = Path("perf-results"),
    variant: Annotated[
        Optional[list[Variant]],
        typer.Option(
            help="Recipe variants to run, in order (repeatable; default: exact, stock, default); see "
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
    device: Annotated[
        Device, typer.Option(help="auto: every visible GPU, else one CPU process (for trying the command).")
    ] = Device.auto,
    as_json: JsonOption = False,
):
    """Stock XTuner and the appliance's speed levers back to back on the same GPUs: one table."""
    from dataclasses import asdict

    import torch

    from bench.synth import write_real_shape_layout
    from entrypoint.perf import (
        DEFAULT_VARIANTS,
        REFERENCE_STEPS_PER_EPOCH,
        compare,
        compare_projectors,
        in_fresh_process,
        measure_matmul_tflops,
        run_variant,
        table,
        write_report,
    )

    chosen = [v.value for v in variant] if variant else list(DEFAULT_VARIANTS)
    layout = Layout.at(root)
    if not layout.dataset_json.exists():
        if not torch.cuda.is_available():
            errors.print(
                f"[red]invalid:[/] {root} holds no layout, and writing the real-shape one needs a GPU; pass --root "
                "to a layout"
            )
            raise typer.Exit(2)
        records = records or REFERENCE_STEPS_PER_EPOCH * per_device_batch * torch.cuda.device_count()
        errors.print(
            f"writing random weights of the real shapes, {samples} images and {records} records to {root} (about 45 "
            "GB)",
            highlight=False,
        )
        in_fresh_process(write_real_shape_layout, root, replace(REAL_SHAPE_SPEC, samples=samples, records=records))
    elif records is not None:
        errors.print(f"[red]invalid:[/] --records applies to a layout written here; {root} already holds one")
        raise typer.Exit(2)
    gpus = torch.cuda.device_count() if device != Device.cpu else 0
    # One micro-batch a step: the layout's record count gives the reference schedule per step.
    run_options = [
        "--max-steps",
        str(steps),
        "--target-loss",
        "1e9",
        "--precision",
        precision.value,
        "--per-device-batch",
        str(per_device_batch),
        "--global-batch",
        str(per_device_batch * max(gpus, 1)),
        "--device",
        device.value,
        "--save-projector",
    ]
    out.mkdir(parents=True, exist_ok=True)
    matmul_device = "cuda" if device != Device.cpu and torch.cuda.is_available() else "cpu"
    matmul_tflops = in_fresh_process(measure_matmul_tflops, matmul_device)
    errors.print(
        f"matmul on this {matmul_device}: {matmul_tflops:.1f} TFLOP/s measured (the limit below)", highlight=False
    )
    verdicts = {name: run_variant(name, root, out, run_options) for name in chosen}
    projectors = compare_projectors(verdicts)
    rows = compare(verdicts, matmul_tflops, projectors)
    report = write_report(out, rows, run_options, matmul_tflops, projectors)
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
