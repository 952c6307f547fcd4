"""The memory facts the appliance decides by, in MiB, each measured on an H200 with the
real shapes (docs/PERFORMANCE.md): what a precision needs, what the levers add or save,
and how a smaller card is simulated on a larger one."""

from __future__ import annotations

from dataclasses import dataclass

# What a GPU needs at batch 32 with the real shapes, by precision: the stock recipe's
# measured peak (NF4 49,451 MiB, bf16 75,949 MiB on an H200, docs/PERFORMANCE.md) plus
# headroom for the allocator. Preflight refuses a smaller card.
REQUIRED_MIB = {"nf4": 52_000, "bf16": 78_000}
# Dequantized NF4 weights take what bf16 weights take.
DEQUANTIZED_NF4_MIB = REQUIRED_MIB["bf16"]

# Peak memory of a batch-32 step with every LLM layer checkpointed, by precision and
# dequantized NF4, measured on an H200 with the real shapes (docs/PERFORMANCE.md).
MEASURED_PER_DEVICE_BATCH = 32
CHECKPOINTED_PEAK_MIB = {("nf4", False): 49_207, ("nf4", True): 75_699, ("bf16", False): 75_699}

# What projecting only the labelled positions saves from those peaks at batch 32: the
# full logits and their gradient (49,207 -> 32,544 MiB measured with NF4; the logits are
# 16-bit in both precisions, so the saving is the same).
LABELLED_LOGITS_SAVING_MIB = 16_663

# What one LLM decoder layer left unchecked adds at batch 32, by the attention it runs
# (docs/PERFORMANCE.md): with SDPA, 3,399 MiB measured at the perf layout's 604 tokens a
# sample, plus 5 % for LLaVA-Pretrain's longer captions; InternLM2's eager attention
# also keeps the fp32 softmax and its fp16 copy, 48 x 604 x 604 a sample (5,977 MiB
# measured with 8 layers unchecked).
UNCHECKED_LAYER_MIB = {"sdpa": 3_600, "eager": 6_000}

# Unchecked layers fill the smallest GPU up to this share: room for longer captions
# than the measured layout's and for the allocator's fragmentation.
UNCHECKED_MEMORY_SHARE = 0.85

# A smaller GPU simulated on a larger one (docs/PERFORMANCE.md, "Method"): each rank's
# allocator is capped at this many MiB (bench/trainer/memory.py), and the lever defaults
# and preflight take it as every GPU's memory...
GPU_MEMORY_CAP_VARIABLE = "LLAVA_BENCH_GPU_MEMORY_CAP_MIB"

# ...unless this one names the memory the lever defaults are computed for: their mistake,
# forced, to show the out-of-memory retry.
MEMORY_MODEL_VARIABLE = "LLAVA_BENCH_MEMORY_MODEL_GPU_MIB"


@dataclass(frozen=True)
class GpuMemory:
    """The GPUs' memory as this run takes it, in MiB: the cards' own, or a smaller card
    simulated through GPU_MEMORY_CAP_VARIABLE (and MEMORY_MODEL_VARIABLE)."""

    cards: tuple[int, ...]  # what preflight checks against
    for_defaults: tuple[int, ...]  # what the lever defaults fill
    cap_mib: int | None = None  # each rank's allocator cap


def gpu_memory(physical_mib: list[int], env) -> tuple[GpuMemory, list[str]]:
    """Read the simulation variables; problems name a variable that is not a positive integer."""
    values, problems = {}, []
    for name in (GPU_MEMORY_CAP_VARIABLE, MEMORY_MODEL_VARIABLE):
        raw = env.get(name)
        if raw is None or raw == "":
            continue
        if not raw.isdigit() or int(raw) == 0:
            problems.append(f"{name}={raw!r} is not a positive number of MiB")
        else:
            values[name] = int(raw)
    cap = values.get(GPU_MEMORY_CAP_VARIABLE)
    cards = tuple(min(mib, cap) for mib in physical_mib) if cap else tuple(physical_mib)
    model = values.get(MEMORY_MODEL_VARIABLE)
    return GpuMemory(cards, tuple(model for _ in physical_mib) if model else cards, cap), problems
