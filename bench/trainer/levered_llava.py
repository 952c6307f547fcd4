"""XTuner's LLaVAModel with the levers that change where work is done, not what is computed.

Named in the rendered config (bench/recipe/render.py) only when one of these levers is on, so
the stock recipe builds XTuner's own class. Imports XTuner: only the trainer
processes load this module.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.utils.checkpoint import checkpoint
from xtuner.model import LLaVAModel
from xtuner.utils import IGNORE_INDEX

from bench.trainer.fused_rotary import fuse_rotary
from bench.trainer.fused_swiglu import fuse_swiglu
from bench.trainer.grouped_attention import fuse_grouped_attention
from bench.trainer.norm_weight import weight_product
from bench.trainer.rotary_once import share_rotary
from bench.trainer.startup import note
from bench.trainer.step_profile import RECOMPUTE_RANGE


class LeveredLLaVAModel(LLaVAModel):
    """``LLaVAModel`` built as the pinned config builds it, then:

    - ``skip_vit_backward``: XTuner makes the frozen ViT's output require gradients and
      checkpoints it, so every step recomputes the ViT and backpropagates through it
      into the pixels, whose gradient nobody reads. Without that the ViT forward is the
      same and the projector's gradients are the same (the projector then runs
      unchecked).
    - ``unchecked_llm_layers``: the last N LLM decoder layers keep their activations
      instead of recomputing their forward in the backward pass (the same forward,
      computed once); the others stay checkpointed.
    - ``selective_llm_layers``: the N layers before those stay checkpointed but keep
      the outputs of their MLP's gate and up projections (PyTorch's selective
      checkpointing), so the backward pass recomputes only their attention and
      elementwise work: the MLP holds three quarters of a layer's FLOPs, and those
      outputs take about a third of what an unchecked layer keeps.
    - ``labelled_logits_only``: the loss's logits only at the positions that have a
      label. The LLM computes 92,544 logits in fp32 for every position, image tokens
      included, and the loss reads only the caption's; each row of the output
      projection is computed on its own, so the loss is the same mean over the same
      terms.
    - ``fused_rms_norm``: the LLM's RMSNorms normalize through torch's fused
      ``rms_norm``: on CUDA 4 kernels a forward and backward, the weight's product
      included, where the model code's eager fp32 ops take 22, each over the whole
      activation (counted on an H200); the same x / sqrt(mean(x^2) + eps) in fp32,
      rounded once to x's dtype, then times the weight in x's dtype, as the model
      code does; on a GPU the weight's product is one Triton kernel each way
      (bench/trainer/norm_weight.py), the same products as torch's broadcast one.
    - ``fused_rotary``: the model code's rotary position embedding in one Triton kernel
      each way (bench/trainer/fused_rotary.py), rounded as its eager ops round.
    - ``fused_swiglu``: each LLM layer's MLP's ``silu(gate) * up`` in one Triton kernel
      each way (bench/trainer/fused_swiglu.py), keeping only the two projections.
    - ``grouped_query_sdpa``: the model code's SDPA attention from its packed projection
      without its copies: SDPA's grouped-query mode, the query and key rotated into
      SDPA's layout in one Triton kernel each way (bench/trainer/grouped_attention.py).
    - ``rotary_once``: the rotary cos and sin computed once a forward for all LLM
      layers, where each layer's attention computed them again, a synchronization with
      the GPU each (bench/trainer/rotary_once.py).
    """

    def __init__(
        self,
        *args,
        skip_vit_backward: bool = False,
        unchecked_llm_layers: int = 0,
        selective_llm_layers: int = 0,
        labelled_logits_only: bool = False,
        fused_rms_norm: bool = False,
        fused_rotary: bool = False,
        fused_swiglu: bool = False,
        grouped_query_sdpa: bool = False,
        rotary_once: bool = False,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.labelled_logits_only = labelled_logits_only
        if skip_vit_backward:
            self.visual_encoder.disable_input_require_grads()
            self.visual_encoder.gradient_checkpointing_disable()
            # Its reentrant checkpoint would now see an input without gradients and give
            # the projector none; unchecked, it trains as before (its activations are small).
            self.projector.gradient_checkpointing_disable()
        if unchecked_llm_layers or selective_llm_layers:
            layers = self.llm.model.layers  # Llama and InternLM2 alike
            self.llm.gradient_checkpointing_disable()
            checkpointed = max(0, len(layers) - unchecked_llm_layers)
            selective_from = max(0, checkpointed - selective_llm_layers)
            for index, layer in enumerate(layers[:checkpointed]):
                policy = _MlpMatmulsKept(_mlp_of(layer)) if index >= selective_from else None
                layer.forward = _checkpointed(layer.forward, policy)
        if fused_rms_norm:
            fuse_rms_norms(self.llm)
        if fused_rotary:
            fuse_rotary(self.llm)
        if fused_swiglu:
            for layer in self.llm.model.layers:
                fuse_swiglu(_mlp_of(layer))
        if grouped_query_sdpa:
            fuse_grouped_attention(self.llm)
        if rotary_once:
            share_rotary(self.llm)
        note("model_built")

    def compute_loss(self, data, data_samples=None):
        if not self.labelled_logits_only:
            return super().compute_loss(data, data_samples)
        # What the causal-LM loss does (transformers' ForCausalLMLoss, InternLM2's own
        # code): position t predicts label t + 1, logits upcast to fp32, mean over the
        # labelled positions; only the rows it reads are computed.
        inputs = {name: value for name, value in data.items() if name != "labels"}
        hidden = self.llm.model(**inputs)[0]
        targets = data["labels"][:, 1:]
        labelled = targets != IGNORE_INDEX
        logits = self.llm.get_output_embeddings()(hidden[:, :-1][labelled]).float()
        return {"loss": torch.nn.functional.cross_entropy(logits, targets[labelled])}


def fuse_rms_norms(llm: torch.nn.Module) -> None:
    """Route each RMSNorm of ``llm`` (InternLM2's and Llama's: a ``weight`` and a
    ``variance_epsilon``) through ``_fused_rms_norm``."""
    for module in llm.modules():
        if type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            module.forward = functools.partial(_fused_rms_norm, module)


def _fused_rms_norm(norm: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The model code's ``weight * (x.float() * rsqrt(x.float().pow(2).mean(-1) + eps)).to(x.dtype)``,
    the normalization fused: torch's ``rms_norm`` computes it in fp32 for 16-bit input
    and rounds it to x's dtype once, as ``.to(x.dtype)`` does; the weight is applied
    after, in x's dtype, so its rounding is the model code's too (on a GPU in one
    Triton kernel each way, bench/trainer/norm_weight.py)."""
    return weight_product(
        norm.weight, torch.nn.functional.rms_norm(hidden, norm.weight.shape, eps=norm.variance_epsilon)
    )


def _checkpointed(forward, policy=None):
    """``forward`` recomputed in the backward pass, but for the outputs ``policy``
    keeps. Non-reentrant, because decoder layers take keyword arguments; it recomputes
    the same forward as the reentrant checkpoint the stock recipe uses."""

    def contexts():
        if policy is None:
            forward_context, recompute_context = contextlib.nullcontext(), contextlib.nullcontext()
        else:
            # torch >= 2.4 only (Levers.selective_llm_layers needs it)
            from torch.utils.checkpoint import create_selective_checkpoint_contexts

            forward_context, recompute_context = create_selective_checkpoint_contexts(policy)
        return forward_context, _named_recompute(recompute_context)

    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, context_fn=contexts, **kwargs)

    return run


@contextlib.contextmanager
def _named_recompute(context):
    """The recompute as a profiler range (`run --profile` sums its kernels), opened
    outside a selective checkpoint's context, which sees every op the recompute runs."""
    with torch.profiler.record_function(RECOMPUTE_RANGE), context:
        yield


def _mlp_of(layer) -> torch.nn.Module:
    """A decoder layer's MLP: InternLM2's ``feed_forward``, Llama's ``mlp``."""
    return getattr(layer, "feed_forward", None) or layer.mlp


_MATMULS = frozenset({torch.ops.aten.mm.default, torch.ops.aten.addmm.default})


class _MlpMatmulsKept:
    """A selective-checkpoint policy: keep the outputs of the matmuls by the widening
    linear layers of one module (the layer's MLP: its gate and up projections), found
    by their weights' storage, and recompute the rest. It keeps no state between
    calls, so a recompute that stops early cannot shift what the next one keeps. The
    down projection is not recomputed either way: the non-reentrant recompute stops
    at the last activation the backward pass needs, the product its input is, and a
    frozen linear keeps none. (4-bit weights are dequantized into a new tensor at each
    matmul: nothing is kept there, and the layer is recomputed whole.)"""

    def __init__(self, module: torch.nn.Module):
        self.widening = [
            linear
            for linear in module.children()
            if isinstance(linear, torch.nn.Linear) and linear.out_features > linear.in_features
        ]

    def __call__(self, ctx, op, *args, **kwargs):
        from torch.utils.checkpoint import CheckpointPolicy

        keep = op in _MATMULS and args[-1].data_ptr() in {linear.weight.data_ptr() for linear in self.widening}
        return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE
