"""The memory facts the appliance decides by, in MiB, each measured on an H200 with the
real shapes (docs/PERFORMANCE.md): what a precision needs, what the levers add or save,
and how a smaller card is simulated on a larger one."""

from __future__ import annotations

from dataclasses import dataclass

from bench.core.shapes import INTERNLM2_20B

# What a GPU needs at batch 32 with the real shapes, by precision: the stock recipe's
# measured peak (NF4 49,451 MiB, bf16 75,949 MiB on an H200, docs/PERFORMANCE.md) plus
# headroom for the allocator. Preflight refuses a smaller card.
REQUIRED_MIB = {"nf4": 52_000, "bf16": 78_000}

# The memory model (docs/PERFORMANCE.md, "The memory model"): a micro-batch's peak is
# what does not grow with it, plus what grows with its padded LLM positions (samples x
# the longest sample's text and image tokens), its logits' rows and, for eager
# attention, the square of its positions. Each figure was measured on an H200 with the
# real shapes at the perf layout's length, batch 32 x 604 positions:
MEASURED_POSITIONS = 32 * 604
# the weights, the ViT and the projector's optimizer: the peak with every LLM layer
# checkpointed less its activations (dequantized NF4 and bf16 alike, 2 bytes a weight;
# 4-bit NF4 26,492 MiB less, as measured between the two on the Llama stand-in);
STATIC_MIB = {("nf4", False): 12_638, ("nf4", True): 39_130, ("bf16", False): 39_130}
# the activations with every layer checkpointed: each layer's input, one layer's forward
# recomputed, the embeddings (55,306 MiB with SDPA, labelled-only logits and no layer
# unchecked, less the static 39,130);
CHECKPOINTED_MIB_PER_POSITION = 16_176 / MEASURED_POSITIONS
# a row of logits: 92,544 in fp16, their fp32 upcast and gradient (16,663 MiB saved by
# computing only the labelled rows, measured on the Llama stand-in);
LOGITS_MIB_PER_ROW = 16_663 / MEASURED_POSITIONS
# one decoder layer left unchecked, with SDPA: what its input gradient needs kept
# (3,408 MiB a layer between 2 and 17 layers unchecked);
UNCHECKED_LAYER_MIB_PER_POSITION = 3_408 / MEASURED_POSITIONS
# one checkpointed layer that keeps its MLP's gate and up outputs (ffn wide each, in
# 16-bit): counted from the 20B shapes;
SELECTIVE_LAYER_MIB_PER_POSITION = 2 * INTERNLM2_20B.ffn * 2 / 2**20
# and with eager attention, its fp32 softmax and fp16 copy besides: bytes per element of
# the heads x positions x positions attention matrix a sample (8 layers unchecked:
# 5,977 MiB a layer over the stand-in's checkpointed peak, 2,569 more than SDPA's), kept
# in every unchecked layer and, while a checkpointed layer is recomputed, in that one.
EAGER_SCORES_BYTES_PER_ELEMENT = 4.8

# The predicted peak fills the smallest GPU up to this share: the rest is for the
# allocator's fragmentation (micro-batches of every length come and go) and what lives
# outside PyTorch (the CUDA context, NCCL's buffers). An out-of-memory failure on an
# H200 came at 122.21 GiB allocated by PyTorch of the card's 140.4: 13 % of it was
# neither. The share is the margin the model errs safe by.
MEMORY_SHARE = 0.85


@dataclass(frozen=True)
class MemoryCase:
    """What the model needs to know of a recipe: its weights, attention and logits."""

    precision: str
    dequantized: bool
    attention: str  # "sdpa" or "eager"
    labelled_logits_only: bool
    attention_heads: int = 48


def peak_mib(case: MemoryCase, samples, positions, labelled, unchecked_layers: int, selective_layers: int = 0):
    """The predicted peak of a micro-batch in MiB: of ``samples`` samples padded to
    ``positions`` LLM positions, with ``labelled`` labelled positions (numbers or numpy
    arrays of them, one per micro-batch)."""
    tokens = samples * positions
    rows = labelled if case.labelled_logits_only else tokens
    layers = unchecked_layers * UNCHECKED_LAYER_MIB_PER_POSITION + selective_layers * SELECTIVE_LAYER_MIB_PER_POSITION
    peak = STATIC_MIB[(case.precision, case.dequantized)] + tokens * (CHECKPOINTED_MIB_PER_POSITION + layers)
    peak = peak + rows * LOGITS_MIB_PER_ROW
    if case.attention == "eager":
        matrix = samples * case.attention_heads * positions**2 * EAGER_SCORES_BYTES_PER_ELEMENT / 2**20
        peak = peak + (1 + unchecked_layers) * matrix
    return peak


def budget_mib(gpu_memory_mib) -> float:
    """What the predicted peak may fill on the smallest GPU."""
    return min(gpu_memory_mib) * MEMORY_SHARE


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
