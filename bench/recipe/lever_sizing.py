"""The memory levers sized by the memory model (bench/recipe/memory_model.py): their
defaults for the run's heaviest micro-batch on the smallest GPU, the leanest setting,
what frees memory after an out-of-memory failure, and the one retry's levers."""

from __future__ import annotations

from dataclasses import replace

from bench.recipe.lever_defaults import dequantization_applies
from bench.recipe.levers import LeverRequest, Levers, lever_option
from bench.recipe.memory_model import STATIC_MIB, MemoryCase, budget_mib, peak_mib


def memory_case(levers: Levers, precision: str, heads: int) -> MemoryCase:
    return MemoryCase(precision, levers.dequantize_nf4, levers.attention, levers.labelled_logits_only, heads)


def worst_peak_mib(levers: Levers, precision: str, plan, heads: int) -> float:
    """The predicted peak of the plan's heaviest micro-batch under ``levers``."""
    peaks = peak_mib(
        memory_case(levers, precision, heads),
        plan.samples,
        plan.positions,
        plan.labelled,
        levers.unchecked_llm_layers,
        levers.selective_llm_layers,
    )
    return float(peaks.max())


def layer_settings(request: LeverRequest, layers: int) -> list[tuple[int, int]]:
    """The (unchecked, selective) layer counts the memory levers choose among, by the
    memory they take and the recompute they save, least first: first more layers keep
    their MLP's matmul outputs (three quarters of a layer's recompute saved for about a
    third of an unchecked layer's memory), then, with all of them kept, selective layers turn
    unchecked one by one. The user's own counts stay."""
    unchecked, selective = request.unchecked_llm_layers, request.selective_llm_layers
    if unchecked is not None and selective is not None:
        return [(unchecked, selective)]
    if unchecked is not None:
        return [(unchecked, n) for n in range(max(0, layers - unchecked) + 1)]
    if selective is not None:
        return [(n, selective) for n in range(max(0, layers - selective) + 1)]
    return [(0, n) for n in range(layers + 1)] + [(n, layers - n) for n in range(1, layers + 1)]


def _with_layers(levers: Levers, setting: tuple[int, int]) -> Levers:
    return replace(levers, unchecked_llm_layers=setting[0], selective_llm_layers=setting[1])


def _layer_peaks(levers: Levers, precision: str, plan, heads: int, settings: list[tuple[int, int]]) -> list[float]:
    """The heaviest micro-batch's predicted peak under each setting."""
    return [worst_peak_mib(_with_layers(levers, setting), precision, plan, heads) for setting in settings]


def size_memory_levers(
    levers: Levers, request: LeverRequest, precision: str, plan, gpu_memory_mib: list[int], layers: int, heads: int
) -> tuple[Levers, dict]:
    """The memory levers' defaults for this run's micro-batches (bench/recipe/micro_batches.py)
    on the smallest GPU: NF4 dequantized where its weights fit beside the heaviest
    micro-batch with every layer checkpointed, then the most layer setting that fits
    (layer_settings); the user's own choices stay. Also what the memory model
    predicted, for the verdict."""
    budget = budget_mib(gpu_memory_mib)
    if request.dequantize_nf4 is None and dequantization_applies("cuda", precision):
        dequantized = _with_layers(replace(levers, dequantize_nf4=True), (0, 0))
        levers = replace(levers, dequantize_nf4=worst_peak_mib(dequantized, precision, plan, heads) <= budget)
    settings = layer_settings(request, layers)
    peaks = _layer_peaks(levers, precision, plan, heads, settings)
    fitting = [setting for setting, peak in zip(settings, peaks) if peak <= budget]
    levers = _with_layers(levers, fitting[-1] if fitting else settings[0])
    return levers, {
        "gpu_memory_mib": min(gpu_memory_mib),
        "budget_mib": round(budget),
        "predicted_peak_mib": round(worst_peak_mib(levers, precision, plan, heads)),
        "dequantize_nf4": levers.dequantize_nf4,
        "unchecked_llm_layers": levers.unchecked_llm_layers,
        "selective_llm_layers": levers.selective_llm_layers,
    }


def leanest(levers: Levers, request: LeverRequest, supports_sdpa: bool | None) -> Levers:
    """The least memory this run's levers can take: every memory-saving lever the user
    left to the appliance on, every memory-spending one off."""
    choices = {
        "dequantize_nf4": False,
        "unchecked_llm_layers": 0,
        "selective_llm_layers": 0,
        "labelled_logits_only": True,
        "sdpa_attention": bool(supports_sdpa),
    }
    return replace(levers, **{name: value for name, value in choices.items() if getattr(request, name) is None})


# The layer counts, with what a layer of each keeps, for the out-of-memory hint.
LAYER_COUNTS = {
    "unchecked_llm_layers": "LLM layers unchecked",
    "selective_llm_layers": "LLM layers keeping their MLP's matmul outputs",
}


def layer_mib(levers: Levers, name: str, precision: str, plan, heads: int) -> float:
    """What one more layer counted by ``name`` (LAYER_COUNTS) adds to the heaviest micro-batch's peak."""
    more = replace(levers, **{name: getattr(levers, name) + 1})
    return worst_peak_mib(more, precision, plan, heads) - worst_peak_mib(levers, precision, plan, heads)


def out_of_memory_hint(precision: str, levers: Levers, plan=None, heads: int = 48) -> str:
    """What would free memory in a run of ``levers`` at ``precision``, most first (with
    the plan's heaviest micro-batch, what each frees there)."""
    helps = []
    for name, kept in LAYER_COUNTS.items():
        count = getattr(levers, name)
        if count:
            fewer = " or ".join(map(str, sorted({count // 2, 0}, reverse=True)))
            each = f", about {layer_mib(levers, name, precision, plan, heads):,.0f} MiB a layer" if plan else ""
            helps.append(f"fewer {kept} ({lever_option(name)} {fewer}){each}")
    if levers.dequantize_nf4:
        saving = STATIC_MIB[("nf4", True)] - STATIC_MIB[("nf4", False)]
        helps.append(f"--no-dequantize-nf4 (the 4-bit weights take about {saving:,} MiB less)")
    if not levers.labelled_logits_only:
        helps.append("--labelled-logits-only (the logits of the labelled positions only)")
    if not levers.sdpa_attention:
        helps.append("--sdpa-attention where the model code has it")
    if precision == "bf16":
        helps.append("--precision nf4 (the pinned recipe's 4-bit weights)")
    helps.append("a smaller --per-device-batch with --global-batch to keep the global batch")
    return "; ".join(helps)


def memory_retry(
    levers: Levers, request: LeverRequest, precision: str, plan, heads: int, shortfall_mib: float
) -> Levers | None:
    """The levers of the one retry after an out-of-memory failure before the first logged
    step, re-sized from what the failure showed: of the layer settings the appliance
    could choose (layer_settings), the most that keeps at most half the memory its
    chosen layers took and frees ``shortfall_mib`` (what the failed allocation asked
    for and what the allocator held unused); only where no layer memory is left to
    take back, its dequantized weights. The user's own choices stay; None when no
    default is left to take back."""
    settings = layer_settings(request, levers.unchecked_llm_layers + levers.selective_llm_layers)
    peaks = _layer_peaks(levers, precision, plan, heads, settings)
    taken = worst_peak_mib(levers, precision, plan, heads) - peaks[0]
    if taken > 0 and len(settings) > 1:
        kept = min(taken / 2, taken - shortfall_mib)
        fitting = [setting for setting, peak in zip(settings, peaks) if peak - peaks[0] <= kept]
        return _with_layers(levers, fitting[-1] if fitting else settings[0])
    if request.dequantize_nf4 is None and levers.dequantize_nf4:
        return replace(levers, dequantize_nf4=False)
    return None
