"""A run's preflight, one stage: every check before anything is launched (topology,
batch, the layout plain and deep with the LLM folder's code imported, disk, GPUs, the
levers) and, if all pass, the recipe."""

from __future__ import annotations

import os
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

from bench.core.inputs import describe
from bench.core.layout import Layout
from bench.core.problem import Problem
from bench.core.run_folder import RunFolder
from bench.core.shapes import are_real_shapes
from bench.recipe.lever_defaults import resolve_levers, tokenized_cache_on, without_unavailable
from bench.recipe.levers import LEVER_NEEDS, STOCK, LeverRequest, chosen_on_gpus
from bench.recipe.memory_model import gpu_memory
from bench.recipe.render import (
    PRECISIONS,
    RecipeOptions,
    RenderedRecipe,
    from_user_config,
    global_batch_plan,
    render,
)
from bench.recipe.schedule import epoch_problem, warmup_problem
from entrypoint import __version__
from entrypoint.job.topology import Topology
from entrypoint.launch.early_start import EarlyTrainer, starts_early
from entrypoint.preflight.deep import deep_problems
from entrypoint.preflight.environment import gpu_inventory, gpu_inventory_details, missing_apis
from entrypoint.preflight.layout_checks import check_writable, inspect_layout
from entrypoint.preflight.machine_checks import disk_problems, gpu_problems
from entrypoint.preflight.model_code import ModelCodeProbe
from entrypoint.preflight.tokenized_cache import CacheBuild, cache_folder
from entrypoint.preflight.user_config import user_config_problems
from entrypoint.request import RunRequest, resolve_device, run_age_seconds, run_topology


@dataclass
class Preflight:
    """Everything decided before anything is launched."""

    device: str
    topology: Topology
    options: RecipeOptions
    problems: list[Problem]
    nowhere_to_write: bool  # the console gets it all
    inventory: list[dict]
    inputs: dict | None
    recipe: RenderedRecipe | None
    tokenization: CacheBuild | None  # the tokenized dataset's build, started as soon as the JSON was read
    gpu_memory_mib: list[int]  # what the memory levers' defaults fill (entrypoint/launch/sizing.py)
    supports_sdpa: bool | None  # the LLM folder's code has an SDPA attention (None: not known)
    gpus: int  # visible GPUs
    gpu_model: str  # "cpu" without GPUs
    driver: str | None
    imports_seconds: float | None  # the process's age when preflight began: its imports (None without /proc)
    lever_request: LeverRequest  # the user's, with the levers this install cannot run held at stock
    levers_held: dict[str, str]  # those of them this run's GPU defaults would choose: name -> what is missing
    run_id: str  # this node's proposal (a job of one node keeps it; its folder holds an early trainer's logs)
    early_trainer: EarlyTrainer | None  # started beside the checks, held at its gate (one node)


def preflight(request: RunRequest, layout: Layout, results_parent: Path, children: ExitStack, run_id: str) -> Preflight:
    """Topology, batch, layout (plain, then deep, with the LLM folder's code imported),
    disk and GPU checks, the levers; the recipe if all pass. Once the cheap checks
    passed, the trainer (one node) and the tokenized dataset's build start beside the
    deep ones, in ``children`` (stopped when the run leaves it)."""
    imports_seconds = run_age_seconds(request)
    gpus, gpu_model, driver = gpu_inventory()
    device = resolve_device(request.device, gpus)
    topology, problems = run_topology(request, device, gpus)
    missing = missing_apis(LEVER_NEEDS.values())
    lever_request, held_problems = without_unavailable(request.levers, missing)
    fix = "leave that option out: the run goes on without the lever"
    problems += [Problem("recipe levers", message, fix) for message in held_problems]
    user_config, per_device_batch = None, request.recipe.per_device_batch
    if layout.config_override.is_file():
        user_config, user_problems = user_config_problems(request, device, layout.config_override)
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
    ]
    early_trainer = None
    if not problems and starts_early(device, topology, layout):
        folder = RunFolder(results_parent / run_id, topology.node_rank)
        float32 = request.recipe.float32_reference
        early_trainer = children.enter_context(EarlyTrainer.start(folder, layout, device, topology, float32))
    with ExitStack() as checking:
        # The model code's import takes longest (a child importing torch, transformers and
        # the folder's code): it starts first, beside reading the JSON and the checks.
        probe = (
            checking.enter_context(ModelCodeProbe(layout.llm_dir))
            if not problems and (layout.llm_dir / "config.json").is_file()
            else None
        )
        layout_problems, dataset = inspect_layout(layout)
        problems += layout_problems
        supports_sdpa, build = None, None
        if not problems:
            if user_config is None and tokenized_cache_on(lever_request, device):
                folder = cache_folder(layout, results_parent, dataset.sha256)
                build = children.enter_context(CacheBuild(layout.dataset_json, layout.llm_dir, folder))
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
            past_the_schedule = epoch_problem(
                request.recipe.max_steps,
                len(dataset.records),
                per_device_batch,
                topology.world_size,
                accumulative_counts,
                (user_config.schedule_epochs or 1) if user_config else 1,
            )
            if past_the_schedule:
                problems.append(
                    Problem(
                        "--max-steps",
                        past_the_schedule,
                        "pass a --max-steps of at most that many steps",
                    )
                )
            code = probe.result()
            supports_sdpa = code.supports_sdpa
            problems += code.problems + disk_problems(results_parent)
    # said where the appliance's GPU defaults would have chosen them
    levers_held = (
        {
            name: f"{path}: {missing[path]}"
            for name, path in LEVER_NEEDS.items()
            if path in missing and chosen_on_gpus(name)
        }
        if device == "cuda" and user_config is None and not request.levers.stock
        else {}
    )
    if user_config is None:
        levers, lever_messages = resolve_levers(lever_request, device, request.recipe.precision, supports_sdpa)
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
    if inputs is not None and build is not None:
        options = replace(options, tokenized_cache_folder=build.folder)
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
    return Preflight(
        device,
        topology,
        options,
        problems,
        nowhere_to_write,
        inventory,
        inputs,
        recipe,
        build,
        list(memory.for_defaults),
        supports_sdpa,
        gpus,
        gpu_model,
        driver,
        imports_seconds,
        lever_request,
        levers_held,
        run_id,
        early_trainer,
    )
