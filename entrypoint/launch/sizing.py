"""The run sized by the data it runs (docs/PERFORMANCE.md, "The memory model"): the
micro-batches every rank will train on, known before launch, and the memory levers'
defaults chosen for the heaviest of them on the smallest GPU, or the run refused when
no setting fits it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from bench.core.problem import Problem
from bench.core.shapes import against_real_shapes
from bench.recipe.lever_sizing import leanest, out_of_memory_hint, size_memory_levers, worst_peak_mib
from bench.recipe.levers import MEMORY_LEVERS, LeverRequest
from bench.recipe.memory_model import MEMORY_SHARE, budget_mib
from bench.recipe.micro_batches import MicroBatchPlan, RecordLengths, bounded, plan
from bench.recipe.render import RecipeOptions
from bench.recipe.tokenization import RECIPE_MAX_LENGTH
from entrypoint.job.agreement import exchange


@dataclass(frozen=True)
class Sizing:
    options: RecipeOptions  # with the memory levers' defaults chosen
    plan: MicroBatchPlan
    memory: dict  # the verdict's recipe.memory: what the model predicted, and for which GPU
    problem: Problem | None  # no setting fits the heaviest micro-batch

    def described(self) -> str:
        """The memory levers chosen and why, in a line."""
        levers, heavy = self.options.levers, self.plan.longest
        return (
            f"{levers.unchecked_llm_layers} LLM layers unchecked, {levers.selective_llm_layers} keeping their MLP's "
            "matmul outputs"
            + (", NF4 dequantized" if levers.dequantize_nf4 else "")
            + f" for the heaviest micro-batch ({heavy.samples} x {heavy.text_tokens} text tokens, step {heavy.step}): "
            f"{self.memory['predicted_peak_mib']:,} MiB predicted of {self.memory['gpu_memory_mib']:,}"
            + (" (the 20B shapes' figure: an upper bound for this smaller model)" if self.memory["upper_bound"] else "")
        )


def record_lengths(tokenization) -> tuple[RecordLengths | None, str | None]:
    """The records' lengths from the tokenized dataset, or why there are none."""
    if tokenization is None:
        return None, "no tokenized dataset (the tokenized-cache lever is off): XTuner tokenizes in the trainer"
    if tokenization.source == "failed":
        return None, f"the appliance's tokenization failed ({tokenization.detail}): XTuner tokenizes in the trainer"
    try:
        return RecordLengths.from_tokenized(Path(tokenization.folder)), None
    except Exception as error:  # noqa: BLE001 - a cache that cannot be read only loses the lengths
        return None, f"the tokenized dataset in {tokenization.folder} could not be read ({type(error).__name__})"


def micro_batch_plan(lengths: RecordLengths | None, why: str | None, options: RecipeOptions, world_size: int, shapes):
    image_tokens = (shapes["vit"]["image_size"] // shapes["vit"]["patch"]) ** 2
    if lengths is None:
        return bounded(why, RECIPE_MAX_LENGTH, options.per_device_batch, world_size, image_tokens)
    return plan(
        lengths,
        options.per_device_batch,
        world_size,
        options.accumulative_counts,
        options.max_steps,
        options.seed,
        image_tokens,
    )


def size_run(
    options: RecipeOptions,
    request: LeverRequest,
    tokenization,
    world_size: int,
    shapes: dict,
    gpu_memory_mib: list[int],
    supports_sdpa: bool | None,
) -> Sizing:
    """The plan, and on GPUs the memory levers sized for it (the user's own choices stay)."""
    lengths, why = record_lengths(tokenization)
    run_plan = micro_batch_plan(lengths, why, options, world_size, shapes)
    if options.device != "cuda" or not gpu_memory_mib:
        return Sizing(options, run_plan, {"sized": False, "why": "not on GPUs"}, None)
    if options.levers.stock:
        return Sizing(options, run_plan, {"sized": False, "why": "every lever off (--stock, or a user's config)"}, None)
    shapes_are = against_real_shapes(shapes)
    if shapes_are == "larger":
        why = (
            "the model is larger than the 20B shapes the memory model was measured on: the memory levers keep "
            "their safe defaults"
        )
        return Sizing(options, run_plan, {"sized": False, "why": why}, None)
    precision, layers, heads = options.precision, shapes["llm"]["layers"], shapes["llm"]["heads"]
    levers, memory = size_memory_levers(options.levers, request, precision, run_plan, gpu_memory_mib, layers, heads)
    upper_bound = shapes_are == "smaller"
    memory = {"sized": True, "why": None, "memory_share": MEMORY_SHARE, "upper_bound": upper_bound, **memory}
    problem = None
    lean = leanest(levers, request, supports_sdpa)
    # an upper bound over the budget refuses nothing: this model may still fit
    if (
        lengths is not None
        and not upper_bound
        and worst_peak_mib(lean, precision, run_plan, heads) > budget_mib(gpu_memory_mib)
    ):
        problem = _no_setting_fits(lengths, options, lean, run_plan, world_size, shapes, gpu_memory_mib)
    return Sizing(replace(options, levers=levers), run_plan, memory, problem)


def size_on_every_node(
    options: RecipeOptions,
    request: LeverRequest,
    tokenization,
    topology,
    shapes: dict,
    gpu_memory_mib: list[int],
    supports_sdpa: bool | None,
) -> Sizing:
    """``size_run``, the same on every node: each node's choice of the memory levers is
    exchanged and the smallest taken (a node whose GPUs were simulated smaller, say)."""
    sizing = size_run(options, request, tokenization, topology.world_size, shapes, gpu_memory_mib, supports_sdpa)
    chosen = {name: getattr(sizing.options.levers, name) for name in MEMORY_LEVERS}
    answers = exchange(topology, "memory-levers", chosen) or [chosen]
    agreed = {name: min(answer[name] for answer in answers) for name in MEMORY_LEVERS}
    return replace(sizing, options=replace(sizing.options, levers=replace(sizing.options.levers, **agreed)))


def _no_setting_fits(lengths, options, lean, run_plan, world_size, shapes, gpu_memory_mib) -> Problem:
    """The refusal: the heaviest micro-batch, its records, and a per-device batch that
    fits with the global batch held by accumulation."""
    heavy = run_plan.longest
    heads = shapes["llm"]["heads"]
    need = worst_peak_mib(lean, options.precision, run_plan, heads)
    global_batch = options.per_device_batch * options.accumulative_counts * world_size
    fits = None
    for batch in range(options.per_device_batch - 1, 0, -1):
        if global_batch % (batch * world_size):
            continue
        smaller = replace(options, per_device_batch=batch, accumulative_counts=global_batch // (batch * world_size))
        smaller_plan = micro_batch_plan(lengths, None, smaller, world_size, shapes)
        if worst_peak_mib(lean, options.precision, smaller_plan, heads) <= budget_mib(gpu_memory_mib):
            fits = batch
            break
    shown = ", ".join(heavy.records[:8]) + (f" and {len(heavy.records) - 8} more" if len(heavy.records) > 8 else "")
    fix = (
        f"--per-device-batch {fits} --global-batch {global_batch} (accumulation keeps the global batch)"
        if fits
        else "no per-device batch fits it: shorten those records (XTuner truncates at 1472 text tokens)"
    )
    return Problem(
        "dataset",
        f"step {heavy.step} (rank {heavy.rank}, micro-iteration {heavy.micro_iteration}) trains {heavy.samples} "
        f"samples padded to {heavy.text_tokens} text tokens ({heavy.positions} positions with the image), records "
        f"{shown}: with every LLM layer checkpointed and every memory-saving lever on the memory model predicts "
        f"{need:,.0f} MiB, more than the {budget_mib(gpu_memory_mib):,.0f} MiB it fills on the smallest GPU "
        f"({MEMORY_SHARE:.0%} of {min(gpu_memory_mib):,} MiB)",
        fix,
    )


def out_of_memory_hint_at(sizing: Sizing, heads: int, log_interval: int) -> Callable[[int], str]:
    """What an out-of-memory failure's reason says, given the last logged iteration:
    what frees memory in this recipe and, from the plan, the heaviest micro-batch among
    those that ran after the last logged one (where the failure was)."""
    options = sizing.options

    def hint(last_iteration: int) -> str:
        frees = out_of_memory_hint(options.precision, options.levers, sizing.plan, heads)
        last = last_iteration + log_interval - 1
        heavy = None if sizing.plan.source == "bound" else sizing.plan.longest_between(last_iteration, last)
        if heavy is None:
            return frees
        return (
            f"{frees}; it failed after iteration {last_iteration} (the last logged); the heaviest micro-batch of "
            f"iterations {last_iteration + 1}-{last + 1} is step {heavy.step}'s on rank {heavy.rank}: "
            f"{heavy.samples} samples padded to {heavy.text_tokens} text tokens ({heavy.positions} positions)"
        )

    return hint
