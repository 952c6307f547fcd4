"""The memory levers sized by the memory model (bench/recipe/memory_model.py): their
defaults for the run's heaviest micro-batch on the smallest GPU, the leanest setting,
what frees memory after an out-of-memory failure, and the one retry's levers."""

from __future__ import annotations

import math
from dataclasses import replace

from bench.recipe.levers import LeverRequest, Levers, dequantization_applies
from bench.recipe.memory_model import STATIC_MIB, MemoryCase, budget_mib, peak_mib


def memory_case(levers: Levers, precision: str, heads: int) -> MemoryCase:
    return MemoryCase(precision, levers.dequantize_nf4, levers.attention, levers.labelled_logits_only, heads)


def worst_peak_mib(levers: Levers, precision: str, plan, heads: int) -> float:
    """The predicted peak of the plan's heaviest micro-batch under ``levers``."""
    peaks = peak_mib(
        memory_case(levers, precision, heads), plan.samples, plan.positions, plan.labelled, levers.unchecked_llm_layers
    )
    return float(peaks.max())


def size_memory_levers(
    levers: Levers, request: LeverRequest, precision: str, plan, gpu_memory_mib: list[int], layers: int, heads: int
) -> tuple[Levers, dict]:
    """The memory levers' defaults for this run's micro-batches (bench/recipe/micro_batches.py)
    on the smallest GPU: NF4 dequantized where its weights fit beside the heaviest
    micro-batch with every layer checkpointed, then as many LLM layers unchecked as fit;
    the user's own choices stay. Also what the memory model predicted, for the verdict."""
    budget = budget_mib(gpu_memory_mib)
    if request.dequantize_nf4 is None and dequantization_applies("cuda", precision):
        dequantized = replace(levers, dequantize_nf4=True, unchecked_llm_layers=0)
        levers = replace(levers, dequantize_nf4=worst_peak_mib(dequantized, precision, plan, heads) <= budget)
    if request.unchecked_llm_layers is None:
        # Each micro-batch's peak is linear in the unchecked layers (a + n b): the count
        # that fits is the smallest (budget - a) / b over the plan, within 0 and ``layers``.
        case = memory_case(levers, precision, heads)
        base = peak_mib(case, plan.samples, plan.positions, plan.labelled, 0)
        per_layer = peak_mib(case, plan.samples, plan.positions, plan.labelled, 1) - base
        fitting = int(((budget - base) // per_layer).min())
        levers = replace(levers, unchecked_llm_layers=min(layers, max(0, fitting)))
    return levers, {
        "gpu_memory_mib": min(gpu_memory_mib),
        "budget_mib": round(budget),
        "predicted_peak_mib": round(worst_peak_mib(levers, precision, plan, heads)),
        "dequantize_nf4": levers.dequantize_nf4,
        "unchecked_llm_layers": levers.unchecked_llm_layers,
    }


def leanest(levers: Levers, request: LeverRequest, supports_sdpa: bool | None) -> Levers:
    """The least memory this run's levers can take: every memory-saving lever the user
    left to the appliance on, every memory-spending one off."""
    choices = {
        "dequantize_nf4": False,
        "unchecked_llm_layers": 0,
        "labelled_logits_only": True,
        "sdpa_attention": bool(supports_sdpa),
    }
    return replace(levers, **{name: value for name, value in choices.items() if getattr(request, name) is None})


def layer_mib(levers: Levers, precision: str, plan, heads: int) -> float:
    """What one more unchecked layer adds to the heaviest micro-batch's peak."""
    more = replace(levers, unchecked_llm_layers=levers.unchecked_llm_layers + 1)
    return worst_peak_mib(more, precision, plan, heads) - worst_peak_mib(levers, precision, plan, heads)


def out_of_memory_hint(precision: str, levers: Levers, plan=None, heads: int = 48) -> str:
    """What would free memory in a run of ``levers`` at ``precision``, most first (with
    the plan's heaviest micro-batch, what each frees there)."""
    helps = []
    if levers.unchecked_llm_layers:
        fewer = sorted({levers.unchecked_llm_layers // 2, 0}, reverse=True)
        each = f", about {layer_mib(levers, precision, plan, heads):,.0f} MiB a layer" if plan is not None else ""
        helps.append(f"fewer LLM layers unchecked (--unchecked-llm-layers {' or '.join(map(str, fewer))}){each}")
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
    step, re-sized from what the failure showed: the unchecked layers the appliance chose
    less those that free ``shortfall_mib`` (what the failed allocation asked for and what
    the allocator held unused), and at most half of them; only where it chose none, its
    dequantized weights. The user's own choices stay; None when no default is left to
    take back."""
    if request.unchecked_llm_layers is None and levers.unchecked_llm_layers:
        give_back = math.ceil(
            shortfall_mib / max(layer_mib(replace(levers, unchecked_llm_layers=0), precision, plan, heads), 1.0)
        )
        fewer = min(levers.unchecked_llm_layers // 2, levers.unchecked_llm_layers - give_back)
        return replace(levers, unchecked_llm_layers=max(0, fewer))
    if request.dequantize_nf4 is None and levers.dequantize_nf4:
        return replace(levers, dequantize_nf4=False)
    return None
