"""Speed levers that keep the pinned recipe's math (docs/PERFORMANCE.md).

Each lever is a recipe option recorded in the verdict; the stock values reproduce the
pinned config exactly (`--stock`). A lever stays only if it computes the same thing:
same data order, same weights' values, same global batch and schedule.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, make_dataclass

# Dataloader workers per rank when the lever is on: the stock config decodes and
# preprocesses images on the training thread (data_time ~6 % of a step, docs/PERFORMANCE.md).
APPLIANCE_DATALOADER_WORKERS = 4


def lever(
    stock,
    help: str,
    deviation=None,
    on_gpus=None,
    perf_variant: str | None = None,
    applied_by_model: bool = False,
    sized_by_memory: bool = False,
    needs: str | None = None,
    runs_on: str | None = None,
):
    """One lever, declared once: its stock value (the pinned config's, and the default
    on CPU), what `run --help` says of it (its option is the field's name in kebab case;
    --no-... turns a switch off), how it changes the config in words for the verdict's
    deviations (``deviation``: value -> text, None where it says nothing), its default on
    GPUs (``on_gpus``; None: stock's, or the memory model's where ``sized_by_memory``),
    the `perf` variant that measures it alone (levers of one name are measured
    together), whether ``LeveredLLaVAModel`` applies it, and whether the GPUs' memory
    decides its default (an out-of-memory failure before the first logged step under
    those defaults is retried with them re-sized), and the API its code calls that not
    every supported install has (``needs``, a dotted path: the image's torch is older than
    the GPU machines'), without which it stays at stock (``without_unavailable``), and the
    lever it changes the work of (``runs_on``): off wherever that one is, and on with it
    in its `perf` variant."""
    return field(
        default=stock,
        metadata={
            "help": help,
            "deviation": deviation,
            "on_gpus": on_gpus,
            "perf_variant": perf_variant,
            "applied_by_model": applied_by_model,
            "sized_by_memory": sized_by_memory,
            "needs": needs,
            "runs_on": runs_on,
        },
    )


@dataclass(frozen=True)
class Levers:
    """Concrete lever settings of one run; ``Levers()`` is the pinned config. The
    fields' order is `run --help`'s and the deviations'."""

    dataloader_workers: int = lever(
        0,
        "Dataloader workers per rank (default: 4 on GPUs, 0 on CPU; the pinned config has 0).",
        lambda n: f"{n} dataloader workers per rank instead of 0 (same sampler, same order)",
        on_gpus=APPLIANCE_DATALOADER_WORKERS,
        perf_variant="workers",
    )
    pin_memory: bool = lever(
        False,
        "Pinned dataloader memory (default: on with GPUs).",
        lambda _: "pinned dataloader memory",
        on_gpus=True,
        perf_variant="workers",
    )
    dequantize_nf4: bool = lever(
        False,
        "Dequantize the NF4 weights once instead of every step; same values, more memory (default: on where the "
        "memory model says they fit beside the run's heaviest micro-batch).",
        lambda _: (
            "NF4 weights dequantized once to fp16 after loading, instead of at every forward and backward "
            "(the same values bitsandbytes computes each step)"
        ),
        perf_variant="dequantize",
        sized_by_memory=True,
    )
    # described with its folder (bench/recipe/render.py)
    tokenized_cache: bool = lever(
        False,
        "Tokenize the dataset before training, beside the checks (XTuner's tokens, in seconds), and keep it under "
        "<results>/cache/ for later runs (default: on GPUs).",
        on_gpus=True,
        perf_variant="tokenized-cache",
    )
    skip_vit_backward: bool = lever(
        False,
        "Run the frozen ViT without autograd: no recomputation or backward pass through it (default: on with GPUs).",
        lambda _: (
            "the frozen ViT runs without autograd, with no recomputation or backward pass through it "
            "(nothing read those gradients), and the projector without checkpointing; the projector's gradients "
            "are the same"
        ),
        on_gpus=True,
        perf_variant="vit",
        applied_by_model=True,
    )
    unchecked_llm_layers: int = lever(
        0,
        "Keep the activations of the last N LLM layers instead of recomputing them (default: as many as the "
        "smallest GPU holds with the run's heaviest micro-batch; 0 on CPU).",
        lambda n: (
            f"the last {n} LLM decoder layers (all, where the model has fewer) keep their activations "
            "instead of recomputing them in the backward pass"
        ),
        perf_variant="unchecked",
        applied_by_model=True,
        sized_by_memory=True,
        needs="torch.utils.checkpoint.noop_context_fn",  # checkpoint() takes a context_fn (torch >= 2.1)
    )
    selective_llm_layers: int = lever(
        0,
        "Recompute only the attention and elementwise work of N checkpointed LLM layers, keeping their MLP's "
        "matmul outputs (default: as many as fit on the smallest GPU with the run's heaviest micro-batch, before "
        "any layer is left unchecked; 0 on CPU).",
        lambda n: (
            f"{n} checkpointed LLM decoder layers keep their MLP's matmul outputs and recompute only their attention "
            "and elementwise work in the backward pass (the same forward)"
        ),
        perf_variant="selective",
        applied_by_model=True,
        sized_by_memory=True,
        needs="torch.utils.checkpoint.create_selective_checkpoint_contexts",
    )
    labelled_logits_only: bool = lever(
        False,
        "Compute the loss's logits only at the labelled positions: the same loss, less memory (default: on GPUs).",
        lambda _: (
            "the loss's logits computed only at the labelled (caption) positions: the same mean over the same terms"
        ),
        on_gpus=True,
        perf_variant="logits",
        applied_by_model=True,
    )
    sdpa_attention: bool = lever(
        False,
        "Run the LLM's attention through its model code's SDPA class instead of eager attention: the same "
        "function, less memory (default: on GPUs where the code has it).",
        lambda _: (
            "the LLM's attention through the model code's own SDPA class (torch scaled_dot_product_attention) "
            "instead of its eager attention: the same softmax(QK^T/sqrt(d) + mask) V without the materialized fp32 "
            "attention matrix"
        ),
        on_gpus=True,
        # measured alone it is stock as the pinned commit runs it: its XTuner dispatches the
        # attention to SDPA (docs/RECIPE.md), the xtuner 0.2.0 installed here does not
        perf_variant="stock-sdpa",
    )
    fused_rms_norm: bool = lever(
        False,
        "Run the LLM's RMSNorm through PyTorch's fused rms_norm kernel (4 CUDA kernels a forward and backward "
        "instead of 22): the same fp32 normalization, rounded as the model code rounds it (default: on GPUs).",
        lambda _: (
            "the LLM's RMSNorm normalizes through torch's fused rms_norm kernel instead of the model code's eager "
            "ops: x / sqrt(mean(x^2) + eps) in fp32, rounded to x's dtype, then times the weight, as the model code "
            "computes it"
        ),
        on_gpus=True,
        perf_variant="fused-norm",
        applied_by_model=True,
        needs="torch.nn.functional.rms_norm",
    )
    fused_rotary: bool = lever(
        False,
        "Apply the LLM's rotary position embedding in one Triton kernel a forward and one a backward instead of "
        "about ten eager ones: the same products and sum, rounded as the model code rounds them (default: on GPUs, "
        "where Triton 3 is installed).",
        lambda _: (
            "the LLM's rotary position embedding (x * cos + rotate_half(x) * sin) in one Triton kernel each way "
            "instead of the model code's eager ops, each product and the sum rounded to the activations' dtype as "
            "they round them"
        ),
        on_gpus=True,
        perf_variant="fused-rotary",
        applied_by_model=True,
        # Triton 3, whose kernels build with enable_fp_fusion (the image's 2.1 has no such option)
        needs="triton.backends",
    )
    fused_swiglu: bool = lever(
        False,
        "Compute the LLM's MLP activation, silu(gate) * up, in one Triton kernel a forward and one a backward "
        "instead of five eager ones, keeping only the two projections: the same fp32 formulas, rounded where the "
        "model code rounds (default: on GPUs, where Triton 3 is installed).",
        lambda _: (
            "the LLM's MLP activation (silu(gate) * up) and its gradients in one Triton kernel each way instead of "
            "the model code's eager ops: the same fp32 formulas, rounded to the activations' dtype where they round"
        ),
        on_gpus=True,
        perf_variant="fused-swiglu",
        applied_by_model=True,
        needs="triton.language.extra.libdevice",
    )
    grouped_query_sdpa: bool = lever(
        False,
        "Run the SDPA attention from the LLM's packed query-key-value projection without copies: the query and key "
        "rotated into SDPA's layout by one Triton kernel each way, each key and value head read for its query heads "
        "(SDPA's grouped-query mode), the projection's gradient written whole (default: on GPUs with torch >= 2.5 "
        "and SDPA attention).",
        lambda _: (
            "the LLM's SDPA attention reads the packed projection's key and value heads once for their query heads "
            "(SDPA's grouped-query mode) instead of the model code's copies, the query and key rotated in one Triton "
            "kernel each way as the model code rounds them: the same attention, its key and value gradients summed "
            "over the query heads inside SDPA"
        ),
        on_gpus=True,
        perf_variant="grouped-query-sdpa",
        applied_by_model=True,
        needs="torch.nn.attention.flex_attention",  # came with SDPA's enable_gqa (torch 2.5)
        runs_on="sdpa_attention",
    )
    rotary_once: bool = lever(
        False,
        "Compute the LLM's rotary cos and sin once a forward for all its layers instead of in every layer's "
        "attention and again in its recompute: the same numbers, one synchronization with the GPU a forward instead "
        "of one a layer (default: on GPUs).",
        lambda _: (
            "the LLM's rotary cos and sin computed once a forward and given to every layer, whose equal rotary "
            "modules receive the same positions, instead of in each layer's attention and recompute: the same numbers"
        ),
        on_gpus=True,
        perf_variant="rotary-once",
        applied_by_model=True,
    )

    @property
    def stock(self) -> bool:
        return self == STOCK

    @property
    def model_kwargs(self) -> dict:
        """The levers ``bench.trainer.levered_llava.LeveredLLaVAModel`` applies, those that are on."""
        return {
            lever.name: getattr(self, lever.name)
            for lever in fields(self)
            if lever.metadata["applied_by_model"] and getattr(self, lever.name)
        }

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
        """How the levers that are on change the config, in words (the math stays the same)."""
        return [
            lever.metadata["deviation"](getattr(self, lever.name))
            for lever in fields(self)
            if lever.metadata["deviation"] is not None and getattr(self, lever.name)
        ]


STOCK = Levers()
LEVER_DECLARATIONS = {lever.name: lever for lever in fields(Levers)}
LEVER_HELP = {lever.name: lever.metadata["help"] for lever in fields(Levers)}
MEMORY_LEVERS = tuple(lever.name for lever in fields(Levers) if lever.metadata["sized_by_memory"])
# Lever -> the API it calls that some supported installs lack.
LEVER_NEEDS = {lever.name: lever.metadata["needs"] for lever in fields(Levers) if lever.metadata["needs"]}
# Lever -> the lever it changes the work of.
LEVER_BASES = {lever.name: lever.metadata["runs_on"] for lever in fields(Levers) if lever.metadata["runs_on"]}


def _measured_alone(lever):
    """The value a lever's perf variant sets: its GPU default, else on (a switch) or, for
    a count the memory model sizes, None (`run`'s own choice on that machine)."""
    if lever.metadata["on_gpus"] is not None:
        return lever.metadata["on_gpus"]
    return True if lever.type == "bool" else None


def _perf_variants() -> dict[str, dict]:
    """`perf`'s single-lever variants: each name -> the levers it sets (every other at stock)."""
    variants: dict[str, dict] = {}
    for lever in fields(Levers):
        if lever.metadata["perf_variant"]:
            variant = variants.setdefault(lever.metadata["perf_variant"], {})
            variant[lever.name] = _measured_alone(lever)
            if base := lever.metadata["runs_on"]:
                variant[base] = _measured_alone(LEVER_DECLARATIONS[base])
    return variants


PERF_VARIANTS = _perf_variants()

LeverRequest = make_dataclass(
    "LeverRequest",
    [("stock", bool, False), *((lever.name, f"{lever.type} | None", None) for lever in fields(Levers))],
    frozen=True,
)
LeverRequest.__doc__ = "What the user asked for: ``None`` for a lever means the appliance's default."


def chosen_on_gpus(name: str) -> bool:
    """Whether the appliance's GPU defaults may turn lever ``name`` on (its declared GPU
    default, or the memory model's choice)."""
    declaration = LEVER_DECLARATIONS[name]
    on_gpus = declaration.metadata["on_gpus"]
    return declaration.metadata["sized_by_memory"] or (on_gpus is not None and on_gpus != declaration.default)


def lever_option(name: str) -> str:
    """The `run` option of lever ``name``."""
    return "--" + name.replace("_", "-")


def lever_arguments(name: str, value) -> list[str]:
    """The `run` arguments that set lever ``name`` to ``value``."""
    if isinstance(getattr(STOCK, name), bool):
        return [lever_option(name) if value else "--no-" + lever_option(name)[2:]]
    return [lever_option(name), str(value)]
