"""Speed levers that keep the pinned recipe's math (docs/PERFORMANCE.md).

Each lever is a recipe option recorded in the verdict; the stock values reproduce the
pinned config exactly (`--stock`). A lever stays only if it computes the same thing:
same data order, same weights' values, same global batch and schedule.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, make_dataclass, replace

from bench.memory_model import (
    CHECKPOINTED_PEAK_MIB,
    DEQUANTIZED_NF4_MIB,
    LABELLED_LOGITS_SAVING_MIB,
    MEASURED_PER_DEVICE_BATCH,
    UNCHECKED_LAYER_MIB,
    UNCHECKED_MEMORY_SHARE,
)

# Dataloader workers per rank when the lever is on: the stock config decodes and
# preprocesses images on the training thread (data_time ~6 % of a step, docs/PERFORMANCE.md).
APPLIANCE_DATALOADER_WORKERS = 4
# The levers whose default the GPUs' memory decides: an out-of-memory failure before
# the first logged step under defaults of these is retried once with them off.
MEMORY_LEVERS = ("dequantize_nf4", "unchecked_llm_layers")


@dataclass(frozen=True)
class Levers:
    """Concrete lever settings of one run; ``Levers()`` is the pinned config."""

    dataloader_workers: int = 0
    pin_memory: bool = False
    dequantize_nf4: bool = False
    tokenized_cache: bool = False
    skip_vit_backward: bool = False
    unchecked_llm_layers: int = 0
    labelled_logits_only: bool = False
    sdpa_attention: bool = False

    @property
    def stock(self) -> bool:
        return self == STOCK

    @property
    def model_kwargs(self) -> dict:
        """The levers ``bench.trainer.levered_llava.LeveredLLaVAModel`` applies, those that are on."""
        names = ("skip_vit_backward", "unchecked_llm_layers", "labelled_logits_only")
        return {name: getattr(self, name) for name in names if getattr(self, name)}

    @property
    def llm_kwargs(self) -> dict:
        """Keyword arguments the levers add to the LLM's ``from_pretrained``."""
        return {"attn_implementation": "sdpa"} if self.sdpa_attention else {}

    @property
    def attention(self) -> str:
        """The attention the LLM runs, as the memory model counts it."""
        return "sdpa" if self.sdpa_attention else "eager"

    def as_dict(self) -> dict:
        return {**asdict(self), "stock": self.stock}

    def deviations(self) -> list[str]:
        """How the levers change the config, in words (the math stays the same)."""
        changes = []
        if self.dataloader_workers:
            changes.append(
                f"{self.dataloader_workers} dataloader workers per rank instead of 0 (same sampler, same order)"
            )
        if self.pin_memory:
            changes.append("pinned dataloader memory")
        if self.dequantize_nf4:
            changes.append(
                "NF4 weights dequantized once to fp16 after loading, instead of at every forward and backward "
                "(the same values bitsandbytes computes each step)"
            )
        if self.skip_vit_backward:
            changes.append(
                "the frozen ViT runs without autograd, with no recomputation or backward pass through it "
                "(nothing read those gradients), and the projector without checkpointing; the projector's gradients "
                "are the same"
            )
        if self.unchecked_llm_layers:
            changes.append(
                f"the last {self.unchecked_llm_layers} LLM decoder layers (all, where the model has fewer) "
                "keep their activations instead of recomputing them in the backward pass"
            )
        if self.labelled_logits_only:
            changes.append(
                "the loss's logits computed only at the labelled (caption) positions: the same mean over the same terms"
            )
        if self.sdpa_attention:
            changes.append(
                "the LLM's attention through the model code's own SDPA class (torch scaled_dot_product_attention) "
                "instead of its eager attention: the same softmax(QK^T/sqrt(d) + mask) V without the materialized "
                "fp32 attention matrix"
            )
        return changes  # the tokenized cache is described with its folder (bench/recipe.py)


STOCK = Levers()

# What `run --help` says of each lever, in the order it lists them. A lever's option
# is its field's name in kebab case (--no-... turns a switch off) and its stock value
# the field's default; the CLI's lever options, LeverRequest and perf's variants are
# derived from Levers and this table.
LEVER_HELP = {
    "dataloader_workers": "Dataloader workers per rank (default: 4 on GPUs, 0 on CPU; the pinned config has 0).",
    "pin_memory": "Pinned dataloader memory (default: on with GPUs).",
    "dequantize_nf4": "Dequantize the NF4 weights once instead of every step; same values, more memory (default: on "
    f"when every GPU has >= {DEQUANTIZED_NF4_MIB} MiB).",
    "tokenized_cache": "Tokenize the dataset before training, beside the checks (XTuner's tokens, in seconds), and "
    "keep it under <results>/cache/ for later runs (default: on GPUs).",
    "skip_vit_backward": "Run the frozen ViT without autograd: no recomputation or backward pass through it (default: "
    "on with GPUs).",
    "unchecked_llm_layers": "Keep the activations of the last N LLM layers instead of recomputing them (default: as "
    "many as the smallest GPU holds; 0 on CPU).",
    "labelled_logits_only": "Compute the loss's logits only at the labelled positions: the same loss, less memory "
    "(default: on GPUs).",
    "sdpa_attention": "Run the LLM's attention through its model code's SDPA class instead of eager attention: the "
    "same function, less memory (default: on GPUs where the code has it).",
}

LeverRequest = make_dataclass(
    "LeverRequest",
    [("stock", bool, False), *((lever.name, f"{lever.type} | None", None) for lever in fields(Levers))],
    frozen=True,
)
LeverRequest.__doc__ = "What the user asked for: ``None`` for a lever means the appliance's default."


def lever_option(name: str) -> str:
    """The `run` option of lever ``name``."""
    return "--" + name.replace("_", "-")


def lever_arguments(name: str, value) -> list[str]:
    """The `run` arguments that set lever ``name`` to ``value``."""
    if isinstance(getattr(STOCK, name), bool):
        return [lever_option(name) if value else "--no-" + lever_option(name)[2:]]
    return [lever_option(name), str(value)]


def unchecked_layers_that_fit(levers: Levers, precision: str, per_device_batch: int, gpu_memory_mib: list[int]) -> int:
    """How many LLM layers may keep their activations on the smallest GPU, beside the
    other levers' memory.

    The measured peaks are of batch 32; a larger batch gets none (its peak is not known),
    a smaller one is held to batch 32's peak (an overestimate, so it stays safe).
    """
    if not gpu_memory_mib or per_device_batch > MEASURED_PER_DEVICE_BATCH:
        return 0
    peak = CHECKPOINTED_PEAK_MIB[(precision, levers.dequantize_nf4)]
    peak -= LABELLED_LOGITS_SAVING_MIB if levers.labelled_logits_only else 0
    budget = min(gpu_memory_mib) * UNCHECKED_MEMORY_SHARE - peak
    per_layer = UNCHECKED_LAYER_MIB[levers.attention] * per_device_batch / MEASURED_PER_DEVICE_BATCH
    return max(0, int(budget // per_layer))


def resolve_levers(
    request: LeverRequest,
    device: str,
    precision: str,
    per_device_batch: int,
    gpu_memory_mib: list[int],
    supports_sdpa: bool | None = None,
) -> tuple[Levers, list[str]]:
    """The levers of this run and, for choices that cannot apply, why (preflight problems).

    Defaults: nothing on CPU (a functional check, not a benchmark); on GPUs, workers
    with pinned memory, NF4 dequantized once where every GPU holds the fp16 weights,
    the tokenized dataset kept for later runs, no backward pass through the frozen ViT,
    logits only at the labelled positions, SDPA attention where the LLM folder's code
    has it (``supports_sdpa``, from preflight's import of that code; None: not known), and, in the memory
    those leave, as many LLM layers unchecked as the smallest GPU allows.
    """
    if request.stock:
        asked = [value for name, value in vars(request).items() if name != "stock"]
        return STOCK, (
            ["--stock (and --float32-reference) turn every lever off; leave out the lever options"]
            if any(v is not None for v in asked)
            else []
        )
    on_gpu = device == "cuda"
    applies = on_gpu and precision == "nf4"
    fits = bool(gpu_memory_mib) and min(gpu_memory_mib) >= DEQUANTIZED_NF4_MIB
    problems = []
    if request.dequantize_nf4 and not applies:
        problems.append("--dequantize-nf4 applies to --precision nf4 on GPUs")
    if request.sdpa_attention and supports_sdpa is False:
        problems.append("--sdpa-attention: the LLM folder's model code has no SDPA attention (_supports_sdpa)")
    levers = Levers(
        dataloader_workers=_asked_or(request.dataloader_workers, APPLIANCE_DATALOADER_WORKERS if on_gpu else 0),
        pin_memory=_asked_or(request.pin_memory, on_gpu),
        dequantize_nf4=applies and _asked_or(request.dequantize_nf4, fits),
        tokenized_cache=tokenized_cache_on(request, device),
        skip_vit_backward=_asked_or(request.skip_vit_backward, on_gpu),
        labelled_logits_only=_asked_or(request.labelled_logits_only, on_gpu),
        sdpa_attention=bool(supports_sdpa) and _asked_or(request.sdpa_attention, on_gpu),
    )
    fitting_layers = unchecked_layers_that_fit(levers, precision, per_device_batch, gpu_memory_mib) if on_gpu else 0
    return replace(levers, unchecked_llm_layers=_asked_or(request.unchecked_llm_layers, fitting_layers)), problems


def tokenized_cache_on(request: LeverRequest, device: str) -> bool:
    """Whether the run keeps the tokenized dataset (decided before the other levers:
    preflight starts its build as soon as it has read the JSON)."""
    return not request.stock and _asked_or(request.tokenized_cache, device == "cuda")


def out_of_memory_hint(precision: str, levers: Levers) -> str:
    """What would free memory in a run of ``levers`` at ``precision``, most first."""
    helps = []
    if levers.unchecked_llm_layers:
        fewer = sorted({levers.unchecked_llm_layers // 2, 0}, reverse=True)
        helps.append(
            f"fewer LLM layers unchecked (--unchecked-llm-layers {' or '.join(map(str, fewer))}), "
            f"about {UNCHECKED_LAYER_MIB[levers.attention]} MiB a layer"
        )
    if levers.dequantize_nf4:
        saving = CHECKPOINTED_PEAK_MIB[("nf4", True)] - CHECKPOINTED_PEAK_MIB[("nf4", False)]
        helps.append(f"--no-dequantize-nf4 (the 4-bit weights take about {saving} MiB less)")
    if not levers.labelled_logits_only:
        helps.append(f"--labelled-logits-only (about {LABELLED_LOGITS_SAVING_MIB} MiB less)")
    if not levers.sdpa_attention:
        helps.append("--sdpa-attention where the model code has it")
    if precision == "bf16":
        helps.append("--precision nf4 (the pinned recipe's 4-bit weights)")
    helps.append("a smaller --per-device-batch with --global-batch to keep the global batch")
    return "; ".join(helps)


def memory_fallback(levers: Levers, request: LeverRequest) -> Levers | None:
    """``levers`` with the memory the appliance's defaults spent taken back (the user's
    own choices stay), for one retry after an out-of-memory failure; None when no
    default spent any."""
    taken_back = {
        name: getattr(STOCK, name)
        for name in MEMORY_LEVERS
        if getattr(request, name) is None and getattr(levers, name) != getattr(STOCK, name)
    }
    return replace(levers, **taken_back) if taken_back else None


def _asked_or(asked, default):
    """The user's choice where there is one (``None``: none was made)."""
    return default if asked is None else asked
