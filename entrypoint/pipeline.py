"""One benchmark run: preflight -> recipe -> launch/supervise -> metrics -> verdict.

Each step is a plain function over plain data; this module only wires them in the
one direction DESIGN §5 fixes, and decides where every file of the run goes.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from importlib import metadata
from pathlib import Path

from rich.console import Console

from bench import verdict as verdict_mod
from bench.config_facts import ConfigFacts, read_facts
from bench.criteria import EXIT_CODES, Criteria, Termination
from bench.flops import are_real_shapes
from bench.inputs import describe, load_dataset
from bench.layout import Layout
from bench.levers import (
    MEMORY_LEVERS,
    STOCK,
    LeverRequest,
    gpu_memory,
    memory_fallback,
    out_of_memory_hint,
    resolve_levers,
    tokenized_cache_folder,
)
from bench.metrics import MetricsRecord, MetricsStream, find_stream, is_finite, read_stream
from bench.recipe import (
    PRECISIONS,
    REFERENCE_GLOBAL_BATCH,
    RecipeOptions,
    RenderedRecipe,
    from_user_config,
    global_batch_plan,
    render,
    warmup_problem,
)
from bench.report import write_report
from entrypoint import __version__
from entrypoint.agreement import AgreementError, Fingerprint, agree, exchange, share_status
from entrypoint.deep import deep_problems, disk_problems, gpu_problems
from entrypoint.diagnose import OUT_OF_MEMORY, logs_report
from entrypoint.environment import gpu_inventory_details, software
from entrypoint.launch import (
    DEEPSPEED_CONFIG,
    AbortOnSignals,
    Interrupted,
    SignalFlag,
    Watchdog,
    process_age_seconds,
    run_to_end,
    supervise,
    torchrun_plan,
    training_plan,
    utc_now,
    write_float32_deepspeed_config,
)
from entrypoint.model_code import ModelCodeProbe
from entrypoint.preflight import Problem, check_layout, check_writable
from entrypoint.progress import ProgressPrinter
from entrypoint.topology import Topology, TopologyError, detect

COLLECTIVE_TIMEOUT_SECONDS = 300
LOG_TAIL_LINES = 20


@dataclass(frozen=True)
class RunRequest:
    root: Path
    out: Path | None
    criteria: Criteria
    recipe: RecipeOptions
    levers: LeverRequest = LeverRequest()
    device: str = "auto"  # auto | cuda | cpu
    global_batch: int | None = None
    demo: bool = False
    world_size_means: str | None = None
    nproc_per_node: int | None = None
    env: Mapping[str, str] | None = None  # the scheduler's variables; os.environ when None
    image_sample: int | None = 1000  # images decoded before training; None: every image
    watchdog: Watchdog = Watchdog()
    # recipe options the user set (e.g. "per_device_batch", "precision"): a user's config
    # keeps its own values of the others
    asked: frozenset[str] = frozenset()


@dataclass(frozen=True)
class RunResult:
    document: dict  # verdict.json on node 0, node-<rank>.json elsewhere
    path: Path | None  # where it was written; None when nothing could be written
    exit_code: int  # the job's status as this node exits with it


def new_run_id() -> str:
    return f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def gpu_inventory() -> tuple[int, str, str | None]:
    """(visible GPUs, model name or "cpu", driver version or None)."""
    import torch

    count = torch.cuda.device_count()
    if count == 0:
        return 0, "cpu", None
    driver = None
    try:
        import pynvml

        pynvml.nvmlInit()
        driver = pynvml.nvmlSystemGetDriverVersion()
    except Exception:  # noqa: BLE001 - the driver version is provenance, not a requirement
        pass
    return count, torch.cuda.get_device_name(0), driver


def resolve_device(requested: str, gpus: int) -> str:
    if requested == "cuda" and gpus == 0:
        raise RuntimeError("--device cuda was asked for, but no CUDA GPU is visible")
    return "cpu" if requested == "cpu" or gpus == 0 else "cuda"


def run_topology(request: RunRequest, device: str, gpus: int) -> tuple[Topology, list[Problem]]:
    """The topology ``run`` launches on ``device``, or the problems why it cannot."""
    env = os.environ if request.env is None else request.env
    try:
        topology = detect(env, gpus if device == "cuda" else 0, request.world_size_means, request.nproc_per_node)
    except TopologyError as error:
        fix = (
            "fix the scheduler's variables or set NNODES, NODE_RANK, ADDR, PORT "
            "(llava-bench topology shows the reading)"
        )
        return detect({}, 0), [Problem("environment", str(error), fix)]
    if device == "cpu" and topology.world_size > 1:
        return topology, [
            Problem(
                "environment",
                f"{topology.nnodes} node(s) x {topology.nproc_per_node} process(es) on CPU: "
                "XTuner trains on CPU only as one process (mmengine needs CUDA for more)",
                "run on GPUs, or on one node with --nproc-per-node 1",
            )
        ]
    if topology.nnodes == 1 and topology.origins["master_port"].startswith("default"):
        # Nobody else needs to find this node: a free port lets two runs share a machine.
        port = free_port()
        topology = replace(topology, master_port=port, origins={**topology.origins, "master_port": f"free port {port}"})
    return topology, []


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def local_fingerprint(
    device, gpus, gpu_model, driver, recipe: RenderedRecipe | None, inputs: dict | None, problems
) -> Fingerprint:
    return Fingerprint(
        appliance_version=__version__,
        gpu_model=gpu_model if device == "cuda" else "cpu",
        gpu_count=gpus if device == "cuda" else 0,
        driver=driver,
        recipe_sha256=recipe.sha256 if recipe else "",
        dataset_sha256=inputs["dataset_sha256"] if inputs else None,
        preflight="ok" if not problems else "invalid",
    )


def check_cluster(request: RunRequest) -> tuple[dict, int]:
    """Rendezvous with every node without training: fingerprints must agree, and one
    collective over all processes must succeed (gloo on CPU, NCCL with bus bandwidth
    on GPUs). Returns (report, exit code); node 0's report holds the placement."""
    import tempfile

    layout = Layout.at(request.root)
    gpus, gpu_model, driver = gpu_inventory()
    device = resolve_device(request.device, gpus)
    env = os.environ if request.env is None else request.env
    try:
        topology = detect(env, gpus if device == "cuda" else 0, request.world_size_means, request.nproc_per_node)
    except TopologyError as error:
        return {"status": "invalid", "reason": str(error)}, EXIT_CODES["invalid"]
    problems = check_layout(layout)
    recipe = None if problems else render(layout, replace(request.recipe, device=device), __version__)
    inputs = None if problems else describe(layout, load_dataset(layout.dataset_json))
    fingerprint = local_fingerprint(device, gpus, gpu_model, driver, recipe, inputs, problems)
    report = {
        "topology": topology.as_dict(),
        "fingerprint": asdict(fingerprint),
        "problems": [p.as_dict() for p in problems],
    }
    try:
        _, fingerprints, _ = agree(topology, fingerprint, new_run_id(), gpu_inventory_details())
    except AgreementError as error:
        return {**report, "status": "invalid", "reason": str(error)}, EXIT_CODES["invalid"]
    with tempfile.TemporaryDirectory(prefix="llava-bench-check-") as scratch:
        result_path = Path(scratch) / "collective.json"
        plan = torchrun_plan(
            topology, ["-m", "entrypoint.collective", str(result_path)], Path(scratch) / "logs", Path(scratch)
        )
        exit_code = run_to_end(plan, COLLECTIVE_TIMEOUT_SECONDS)
        interconnect = json.loads(result_path.read_text()) if result_path.exists() else None
        tails = _log_tails(plan.logs_dir) if exit_code != 0 else {}
    if exit_code != 0:
        reason = "the collective over all processes " + (
            "timed out" if exit_code is None else f"failed (exit {exit_code})"
        )
        return {**report, "status": "error", "reason": reason, "log_tails": tails}, EXIT_CODES["error"]
    reason = f"{topology.nnodes} node(s) agree; a collective over {topology.world_size} processes succeeded"
    report = {**report, "status": "ok", "reason": reason, "fingerprints": [asdict(f) for f in fingerprints]}
    return {**report, "interconnect": interconnect}, 0


def _log_tails(logs_dir: Path) -> dict[str, list[str]]:
    return {
        str(log.relative_to(logs_dir)): log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        for log in sorted(logs_dir.rglob("*.log"))
    }


def _interconnect(topology: Topology, run_dir: Path, cwd: Path) -> tuple[dict | None, str | None]:
    """Placement of every process and NCCL bus bandwidth, or the reason it failed."""
    result_path = run_dir / "collective.json"
    logs_dir = run_dir / "logs" / f"node-{topology.node_rank}" / "collective"
    plan = torchrun_plan(topology, ["-m", "entrypoint.collective", str(result_path)], logs_dir, cwd)
    exit_code = run_to_end(plan, COLLECTIVE_TIMEOUT_SECONDS)
    if exit_code != 0:
        return None, (
            f"the collective check over all {topology.world_size} processes "
            + ("timed out" if exit_code is None else f"failed (exit {exit_code})")
            + f"; see {plan.logs_dir}"
        )
    return (json.loads(result_path.read_text()) if result_path.exists() else None), None


def xtuner_provenance() -> tuple[str, str | None]:
    """Installed XTuner version, and the git commit when pip recorded one (PEP 610)."""
    distribution = metadata.distribution("xtuner")
    direct_url = distribution.read_text("direct_url.json")
    commit = json.loads(direct_url).get("vcs_info", {}).get("commit_id") if direct_url else None
    return distribution.version, commit


def _user_config(request: RunRequest, device: str, config: Path) -> tuple[ConfigFacts | None, list[Problem]]:
    """What a user's config does as written, and the options that cannot apply to it:
    the appliance never rewrites a user's model, so precision and levers are the file's."""
    fix = "leave the option out (the config's own value runs), edit the config, or remove it to use the built-in recipe"
    try:
        facts = read_facts(config.read_text())
    except SyntaxError:
        return None, []  # the layout checks name it
    problems = []
    cpu_obstacles = [
        what
        for what, present in (
            ("4-bit weights (bitsandbytes)", facts.precision == "nf4"),
            ("AmpOptimWrapper", facts.optimizer_wrapper == "AmpOptimWrapper"),
        )
        if present
    ]
    if device == "cpu" and cpu_obstacles:
        problems.append(
            Problem(
                str(config),
                f"a user config runs as written, and on CPU this one cannot: {' and '.join(cpu_obstacles)} "
                "need CUDA (the built-in recipe has a CPU variant)",
                "run on GPUs, or remove the config",
            )
        )
    if "precision" in request.asked and facts.precision != request.recipe.precision:
        problems.append(
            Problem(
                "--precision",
                f"{request.recipe.precision}, but the config loads the LLM as "
                f"{facts.precision or 'something the appliance cannot read'}",
                fix,
            )
        )
    asked_levers = [name for name, value in vars(request.levers).items() if value not in (None, False)]
    if asked_levers:
        problems.append(
            Problem(
                "recipe levers", f"{', '.join(asked_levers)} apply to the built-in recipe, not to a user's config", fix
            )
        )
    unreadable = [key for key in facts.unreadable() if key != "train_cfg.max_iters"]  # the appliance sets max_iters
    if unreadable:
        problems.append(
            Problem(
                str(config),
                f"cannot read {', '.join(unreadable)} from it (only literal values, names and arithmetic are read)",
                "write them as literal values",
            )
        )
    return facts, problems


def _recipe_record(recipe: RenderedRecipe, options: RecipeOptions, world_size: int) -> dict:
    """What ran, read back from the config XTuner was given and its --cfg-options."""
    xtuner_version, xtuner_commit = xtuner_provenance()
    facts = read_facts(recipe.text, recipe.cfg_options)
    global_batch = facts.per_device_batch * facts.accumulative_counts * world_size
    return {
        "source": recipe.source,
        "config_sha256": recipe.sha256,
        "appliance_version": __version__,
        "xtuner_version": xtuner_version,
        "xtuner_commit": xtuner_commit,
        "precision": facts.precision,
        "device": options.device,
        "per_device_batch": facts.per_device_batch,
        "accumulative_counts": facts.accumulative_counts,
        "global_batch": global_batch,
        "reference_global_batch": REFERENCE_GLOBAL_BATCH,
        "on_reference_schedule": global_batch == REFERENCE_GLOBAL_BATCH,
        "max_iters": facts.max_iters,
        "seed": options.seed,
        "levers": options.levers.as_dict(),
        "deviations": recipe.deviations,
        "cfg_options": recipe.cfg_options,
    }


def _stop_check(criteria: Criteria, printer: ProgressPrinter):
    """Print each record; stop at a non-finite loss (the verdict is fail) or, if asked, at the target."""

    def on_record(record: MetricsRecord) -> Termination | None:
        printer(record)
        if not is_finite(record.loss):
            return Termination("stopped_nonfinite_loss", f"loss {record.loss} at iteration {record.iter}")
        if criteria.stop_on_target and record.loss < criteria.target_loss:
            return Termination("stopped_on_target", "ended by the appliance at the first crossing")
        return None

    return on_record


@dataclass
class _Preflight:
    """Everything decided before anything is launched."""

    device: str
    topology: Topology
    options: RecipeOptions
    problems: list[Problem]
    nowhere_to_write: bool  # the console gets it all
    inventory: list[dict]
    inputs: dict | None
    recipe: RenderedRecipe | None


def _preflight(request: RunRequest, layout: Layout, results_parent: Path, gpus: int) -> _Preflight:
    """Topology, batch, layout (plain, then deep, with the LLM folder's code imported),
    disk and GPU checks, the levers; the recipe if all pass."""
    device = resolve_device(request.device, gpus)
    topology, problems = run_topology(request, device, gpus)
    user_config, per_device_batch = None, request.recipe.per_device_batch
    if layout.config_override.is_file():
        user_config, user_problems = _user_config(request, device, layout.config_override)
        problems += user_problems
        if user_config is not None and "per_device_batch" not in request.asked and user_config.per_device_batch:
            per_device_batch = user_config.per_device_batch
    reference = device == "cuda" and not request.demo  # CPU runs and the demo are functional checks
    _, accumulative_counts, batch_problem = global_batch_plan(
        request.global_batch, per_device_batch, topology.world_size, reference
    )
    if batch_problem:
        problems.append(
            Problem("--global-batch", batch_problem, "choose a per-device batch or global batch that divide")
        )
    inventory = gpu_inventory_details() if device == "cuda" else []
    memory, memory_messages = gpu_memory(
        [gpu["memory_mib"] for gpu in inventory], os.environ if request.env is None else request.env
    )
    unwritable = check_writable(results_parent, layout)
    problems = [
        *problems,
        *unwritable,
        *(
            Problem("environment", message, "set it to the simulated card's MiB, or unset it")
            for message in memory_messages
        ),
        *check_layout(layout),
    ]
    dataset, supports_sdpa = None, None
    if not problems:
        dataset = load_dataset(layout.dataset_json)
        with ModelCodeProbe(layout.llm_dir) as probe:
            problems = deep_problems(layout, dataset, request.image_sample)
            too_few = (
                None if user_config else warmup_problem(len(dataset.records), per_device_batch, topology.world_size)
            )
            if too_few:
                problems.append(
                    Problem(
                        str(layout.dataset_json),
                        too_few,
                        "use the whole LLaVA-Pretrain JSON, or a smaller --per-device-batch",
                    )
                )
            code = probe.result()
        supports_sdpa = code.supports_sdpa
        problems += code.problems + disk_problems(results_parent)
    if user_config is None:
        levers, lever_messages = resolve_levers(
            request.levers, device, request.recipe.precision, per_device_batch, list(memory.for_defaults), supports_sdpa
        )
        problems += [
            Problem("recipe levers", message, "change the lever options (--help)") for message in lever_messages
        ]
    else:
        levers = STOCK  # a user's config runs as written
    options = replace(
        request.recipe,
        device=device,
        per_device_batch=per_device_batch,
        accumulative_counts=accumulative_counts,
        levers=levers,
        gpu_memory_cap_mib=memory.cap_mib if device == "cuda" else None,
        precision=user_config.precision
        if user_config is not None and user_config.precision in PRECISIONS
        else request.recipe.precision,
    )
    inputs = describe(layout, dataset) if not problems else None
    if inputs is not None and levers.tokenized_cache:
        options = replace(
            options,
            tokenized_cache_folder=tokenized_cache_folder(results_parent, inputs["dataset_sha256"], layout.llm_dir),
        )
    if inputs is not None:
        real_shapes = are_real_shapes(inputs["model_shapes"])
        cards = [{**gpu, "memory_mib": mib} for gpu, mib in zip(inventory, memory.cards)]
        problems += gpu_problems(cards, options.precision, options.per_device_batch, real_shapes)
    recipe = None
    if not problems:
        recipe = (
            from_user_config(layout.config_override, options, user_config)
            if user_config is not None
            else render(layout, options, __version__)
        )
    # An unwritable --out, or no layout mounted at the root (whose results folder must
    # not be created either).
    nowhere_to_write = bool(unwritable) or (request.out is None and not layout.root.is_dir())
    return _Preflight(device, topology, options, problems, nowhere_to_write, inventory, inputs, recipe)


def execute(request: RunRequest, console: Console) -> RunResult:
    """One run to its verdict. A signal before training ends it as aborted with a
    verdict (preflight of 558k records takes seconds; the agreement may wait minutes);
    during training the supervisor stops the trainer; after it, what ran is written."""
    layout = Layout.at(request.root)
    results_parent = Path(request.out).absolute() if request.out else layout.results_dir
    try:
        with AbortOnSignals() as before_training:
            return _execute(request, console, layout, results_parent, before_training)
    except Interrupted as stop:
        return _aborted_before_training(request, layout, results_parent, stop)


def _aborted(stop: Interrupted) -> Termination:
    return Termination("aborted", f"{stop.signal_name} received before training started; no trainer was launched")


def _aborted_before_training(request: RunRequest, layout: Layout, results_parent: Path, stop: Interrupted) -> RunResult:
    """A signal before the run had a folder: a verdict of its own, where it can be written."""
    context = verdict_mod.RunContext(
        run_id=new_run_id(),
        criteria=request.criteria,
        termination=_aborted(stop),
        demo=request.demo,
    )
    verdict = verdict_mod.build(context, MetricsStream([], 0))
    if check_writable(results_parent, layout) or (request.out is None and not layout.root.is_dir()):
        return RunResult(verdict, None, verdict["exit_code"])
    run_dir = results_parent / context.run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    path = verdict_mod.write(run_dir, verdict)
    write_report(run_dir, verdict)
    return RunResult(verdict, path, verdict["exit_code"])


def _execute(
    request: RunRequest, console: Console, layout: Layout, results_parent: Path, before_training: AbortOnSignals
) -> RunResult:
    gpus, gpu_model, driver = gpu_inventory()
    checked = _preflight(request, layout, results_parent, gpus)
    device, topology, options, problems = checked.device, checked.topology, checked.options, checked.problems
    recipe, inputs, inventory = checked.recipe, checked.inputs, checked.inventory
    fingerprint = local_fingerprint(device, gpus, gpu_model, driver, recipe, inputs, problems)
    run_id, inventories = new_run_id(), [inventory]
    if not any(p.path == "environment" for p in problems):
        try:
            run_id, _, inventories = agree(topology, fingerprint, run_id, inventories[0])
        except AgreementError as error:
            problems.append(
                Problem(
                    "other nodes", str(error), "run the same image, layout and recipe on the same GPUs on every node"
                )
            )
    before_training.check()  # a signal that code on the way swallowed
    context = verdict_mod.RunContext(
        run_id=run_id,
        criteria=request.criteria,
        termination=Termination("unknown"),
        accumulative_counts=options.accumulative_counts,
        per_device_batch=options.per_device_batch,
        world_size=topology.world_size,
        demo=request.demo,
        topology={**topology.as_dict(), "launch_command": []},
        environment={
            "software": software(),
            "gpus": [{"node_rank": rank, **gpu} for rank, node_gpus in enumerate(inventories) for gpu in node_gpus],
        },
        inputs=inputs,
    )
    run_dir = results_parent / run_id
    if problems:
        context = replace(context, problems=[p.as_dict() for p in problems])
        if checked.nowhere_to_write:
            invalid = verdict_mod.build(context, MetricsStream([], 0))
            return RunResult(invalid, None, invalid["exit_code"])
        run_dir.mkdir(parents=True, exist_ok=True)
        return _finish(topology, run_dir, context, fingerprint, MetricsStream([], 0))
    run_dir.mkdir(parents=True, exist_ok=True)
    plan = _write_attempt(recipe, run_dir, layout, device, topology)
    console.print(
        f"[bold]llava-bench[/] run {run_id}: {topology.nnodes} node(s) x {topology.nproc_per_node} x {device} "
        f"(this is node {topology.node_rank}), {options.max_steps} steps, target loss < {request.criteria.target_loss}"
    )
    console.print(f"  results: {run_dir}", highlight=False)
    context = replace(
        context,
        recipe=_recipe_record(recipe, options, topology.world_size),
        topology={**topology.as_dict(), "launch_command": plan.argv},
    )
    try:
        if device == "cuda":
            interconnect, failure = _interconnect(topology, run_dir, layout.root)
            context = replace(context, interconnect=interconnect)
            if failure:
                now = utc_now()
                context = replace(
                    context,
                    termination=Termination("crashed", failure),
                    timing={
                        "preflight_seconds": process_age_seconds(),
                        "started_at": now,
                        "first_record_at": None,
                        "first_record_seconds": None,
                        "ended_at": now,
                        "wall_seconds": 0.0,
                    },
                )
                return _finish(topology, run_dir, context, fingerprint, MetricsStream([], 0))
        before_training.check()
    except Interrupted as stop:  # the run's folder exists: its verdict goes there
        return _finish(
            topology, run_dir, replace(context, termination=_aborted(stop)), fingerprint, MetricsStream([], 0)
        )
    preflight_seconds = process_age_seconds()
    run = _Run(request, console, layout, run_dir, topology, fingerprint)
    with SignalFlag() as after_training:  # from here on a signal no longer loses what ran
        return _train_and_judge(run, plan, recipe, options, context, preflight_seconds, after_training)


@dataclass(frozen=True)
class _Run:
    """What the stages after preflight share."""

    request: RunRequest
    console: Console
    layout: Layout
    run_dir: Path
    topology: Topology
    fingerprint: Fingerprint


def _train_and_judge(run: _Run, plan, recipe, options, context, preflight_seconds, signals: SignalFlag) -> RunResult:
    """Train (once more with the memory defaults taken back after an early out-of-memory
    failure, unless a signal came), then the verdict of what ran."""
    request, console, layout, run_dir, topology = run.request, run.console, run.layout, run.run_dir, run.topology
    outcome, started_at, wall_seconds = _train(plan, run_dir, request, options, console)
    fallback = memory_fallback(options.levers, request.levers) if recipe.source == "template" else None
    if fallback is not None and signals.received is None and _retry_agreed(topology, outcome, plan.logs_dir):
        first_attempt = {
            "reason": outcome.termination.detail,
            "folder": _set_aside_first_attempt(run_dir, topology.node_rank).name,
            "config_sha256": recipe.sha256,
            "levers": options.levers.as_dict(),
            "wall_seconds": wall_seconds,
            "taken_back": [
                f"{name} {getattr(options.levers, name)!r} -> {getattr(fallback, name)!r}"
                for name in MEMORY_LEVERS
                if getattr(options.levers, name) != getattr(fallback, name)
            ],
        }
        console.print(
            "[yellow]out of GPU memory before the first logged step[/] with the appliance's memory defaults "
            f"({', '.join(first_attempt['taken_back'])}); restarting once with them taken back",
            highlight=False,
        )
        options = replace(options, levers=fallback)
        recipe = render(layout, options, __version__)
        plan = _write_attempt(recipe, run_dir, layout, options.device, topology)
        outcome, started_at, wall_seconds = _train(plan, run_dir, request, options, console)
        context = replace(
            context, recipe={**_recipe_record(recipe, options, topology.world_size), "memory_fallback": first_attempt}
        )
    context = replace(
        context,
        termination=outcome.termination,
        trainer_exit_code=outcome.exit_code,
        timing={
            "preflight_seconds": preflight_seconds,
            "started_at": started_at,
            "first_record_at": outcome.first_record_at,
            "first_record_seconds": outcome.first_record_seconds,
            "ended_at": outcome.ended_at,
            "wall_seconds": wall_seconds,
        },
    )
    metrics_copy = run_dir / verdict_mod.METRICS_NAME
    stream_path = find_stream(run_dir / "xtuner")
    if topology.node_rank == 0:
        if stream_path is not None:
            shutil.copyfile(stream_path, metrics_copy)
        else:
            metrics_copy.write_text("")
    stream = read_stream(metrics_copy) if topology.node_rank == 0 else MetricsStream([], 0)
    return _finish(topology, run_dir, context, run.fingerprint, stream)


def _write_attempt(recipe: RenderedRecipe, run_dir: Path, layout: Layout, device: str, topology: Topology):
    """config.py of this attempt and the command that trains it."""
    config_path = run_dir / "config.py"
    config_path.write_text(recipe.text)
    deepspeed = write_float32_deepspeed_config(run_dir) if recipe.float32 else DEEPSPEED_CONFIG
    return training_plan(
        config_path,
        run_dir / "xtuner",
        run_dir / "logs" / f"node-{topology.node_rank}",
        layout.root,
        device,
        topology,
        recipe.cfg_options,
        deepspeed,
    )


def _train(plan, run_dir: Path, request: RunRequest, options: RecipeOptions, console: Console):
    """One training attempt to its end: (outcome, start time, wall seconds)."""
    started_at, started = utc_now(), time.monotonic()
    printer = ProgressPrinter(console, options.max_steps, options.accumulative_counts)
    outcome = supervise(
        plan,
        run_dir / "xtuner",
        _stop_check(request.criteria, printer),
        request.watchdog,
        out_of_memory_hint=out_of_memory_hint(options.precision, options.levers),
    )
    if outcome.termination.kind not in ("completed", "stopped_on_target"):
        # said here too: should the verdict not be writable (a full disk), the console has it
        console.print(f"[yellow]training {outcome.termination.kind}[/]: {outcome.termination.detail}", highlight=False)
    return outcome, started_at, round(time.monotonic() - started, 3)


def _retry_agreed(topology: Topology, outcome, logs_dir: Path) -> bool:
    """Whether every node restarts: all crashed, one ran out of GPU memory, and node 0
    (the node that reads the metrics) saw no step logged. The nodes exchange what they saw."""
    seen = {
        "crashed": outcome.termination.kind == "crashed",
        "out_of_memory": logs_report(logs_dir, OUT_OF_MEMORY),
        "stepped": outcome.first_record_at is not None,
    }
    answers = exchange(topology, "memory-retry", seen)
    if answers is None:
        return False
    return all(a["crashed"] for a in answers) and any(a["out_of_memory"] for a in answers) and not answers[0]["stepped"]


def _set_aside_first_attempt(run_dir: Path, node_rank: int) -> Path:
    """The failed attempt's config, XTuner work dir and training logs, moved under
    attempt-1/ (the collective check's logs stay); the retry writes where they were."""
    aside = run_dir / "attempt-1"
    logs = run_dir / "logs" / f"node-{node_rank}"
    (aside / "logs" / logs.name).mkdir(parents=True, exist_ok=True)
    for path in [run_dir / "config.py", run_dir / "xtuner", *(p for p in logs.iterdir() if p.name != "collective")]:
        try:
            path.rename(aside / path.relative_to(run_dir))
        except FileNotFoundError:  # another node on a shared filesystem moved it
            pass
    return aside


def _finish(topology: Topology, run_dir: Path, context, fingerprint: Fingerprint, stream: MetricsStream) -> RunResult:
    """Node 0 writes the verdict and tells the others the job's status; they write node-<rank>.json."""
    if topology.node_rank == 0:
        verdict = verdict_mod.build(context, stream)
        path = verdict_mod.write(run_dir, verdict)
        write_report(run_dir, verdict)
        share_status(topology, verdict["status"])
        return RunResult(verdict, path, verdict["exit_code"])
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
        "fingerprint": asdict(fingerprint),
        "log_tails": _log_tails(run_dir / "logs" / f"node-{topology.node_rank}"),
    }
    path = run_dir / f"node-{topology.node_rank}.json"
    verdict_mod.write_atomic(path, json.dumps(document, indent=2) + "\n")
    return RunResult(document, path, document["exit_code"])
