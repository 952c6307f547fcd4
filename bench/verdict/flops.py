"""FLOPs of one LLaVA pretraining step, and MFU against the GPU's dense peak.

XTuner's ThroughputHook counts only the padded text tokens (the 576 image tokens are
inserted later) and assumes weight gradients, which a frozen LLM never computes.
This model counts per sample, s = text tokens + image tokens (a matmul of m x k by
k x n is 2mkn FLOPs; NF4 matmuls count as the dense matmuls they stand for).

Model FLOPs, what the math needs (MFU divides these; the same for stock and levers):
- frozen LLM: forward 2 x (linear parameters) + causal attention 2 x s x h per layer
  and token; backward only for input gradients: the same linear FLOPs again, and
  twice the attention FLOPs (gradients of Q, K and V);
- the LM head only at the labelled positions (the caption's, which the loss reads):
  2 x h x V a row forward and again backward;
- frozen CLIP ViT: forward only (nothing upstream needs its gradients);
- trained projector: forward, plus input and weight gradients (3 x forward).

Hardware FLOPs, what the run's recipe executes (HFU divides these):
- the recompute of every checkpointed LLM layer's forward (not the head's), of only
  its attention for a layer that keeps its MLP's matmul outputs;
- the LM head at every position unless the labelled-only logits lever is on;
- stock's ViT: checkpointed and backpropagated into the pixels, so its forward is
  recomputed and its input-gradient backward (linear again, attention twice) runs;
  the projector is checkpointed with it (one forward more); with the ViT lever,
  neither.
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.core.shapes import CLIP_VIT_L_336, INTERNLM2_20B, LLMShape, ViTShape


@dataclass(frozen=True)
class StepFlops:
    model_flops: float  # what the step needs; MFU divides these
    hardware_flops: float  # what the recipe executes; HFU divides these
    sequence_length: float  # per sample: padded text tokens + image tokens


@dataclass(frozen=True)
class RecipeWork:
    """What the run's recipe executes beyond the math (from its levers)."""

    checkpointed_llm_layers: int  # recomputed in the backward pass
    vit_backward: bool  # stock: the ViT checkpointed and backpropagated into the pixels
    head_at_every_position: bool  # stock: the LM head over the whole sequence
    selective_llm_layers: int = 0  # of the checkpointed, those recomputing only their attention

    @classmethod
    def of(cls, levers: dict, llm_layers: int) -> "RecipeWork":
        """From a verdict's ``recipe.levers``."""
        return cls(
            checkpointed_llm_layers=max(0, llm_layers - levers.get("unchecked_llm_layers", 0)),
            selective_llm_layers=levers.get("selective_llm_layers", 0),
            vit_backward=not levers.get("skip_vit_backward", False),
            head_at_every_position=not levers.get("labelled_logits_only", False),
        )


STOCK_WORK = RecipeWork(checkpointed_llm_layers=INTERNLM2_20B.layers, vit_backward=True, head_at_every_position=True)


def vit_forward_flops(vit: ViTShape) -> tuple[float, float, float]:
    """One image through the ViT: (patch embedding, the layers' linear, the layers' attention) FLOPs."""
    tokens = vit.tokens
    patch_embedding = 2 * (3 * vit.patch * vit.patch) * vit.hidden * vit.patches
    linear = 2 * (4 * vit.hidden * vit.hidden + 2 * vit.hidden * vit.ffn) * tokens
    attention = 4 * tokens * tokens * vit.hidden  # scores and weighted sum, not causal
    return patch_embedding, vit.layers * linear, vit.layers * attention


def projector_forward_flops(vit: ViTShape, llm: LLMShape) -> float:
    """Linear(vit, llm) - GELU - Linear(llm, llm) over the image tokens of one image."""
    return 2 * (vit.hidden * llm.hidden + llm.hidden * llm.hidden) * vit.patches


def llm_layer_flops(llm: LLMShape, sequence: float) -> tuple[float, float]:
    """(linear, attention) FLOPs of one sample's forward through all decoder layers."""
    linear = 2 * llm.linear_params_per_layer * sequence * llm.layers
    attention = 2 * sequence * sequence * llm.hidden * llm.layers  # causal: half of 4 s^2 h
    return linear, attention


def llm_mlp_flops(llm: LLMShape, sequence: float) -> float:
    """The MLPs' share of llm_layer_flops' linear FLOPs (gate, up and down)."""
    return 2 * 3 * llm.hidden * llm.ffn * sequence * llm.layers


def step_flops(
    samples: int,
    text_tokens_per_sample: float,
    labelled_tokens_per_sample: float,
    llm: LLMShape = INTERNLM2_20B,
    vit: ViTShape = CLIP_VIT_L_336,
    work: RecipeWork = STOCK_WORK,
) -> StepFlops:
    """FLOPs of one optimizer step over ``samples`` samples (one image each)."""
    sequence = text_tokens_per_sample + vit.patches
    linear, attention = llm_layer_flops(llm, sequence)
    head_row = 2 * llm.hidden * llm.vocab
    vit_embedding, vit_linear, vit_attention = vit_forward_flops(vit)
    projector = projector_forward_flops(vit, llm)
    model = (
        (linear + attention)
        + (linear + 2 * attention)  # forward + input-gradient backward
        + 2 * head_row * labelled_tokens_per_sample
        + vit_embedding
        + vit_linear
        + vit_attention
        + 3 * projector
    )
    selective = min(work.selective_llm_layers, work.checkpointed_llm_layers)
    layer, layer_mlp = (linear + attention) / llm.layers, llm_mlp_flops(llm, sequence) / llm.layers
    recomputed = layer * work.checkpointed_llm_layers - layer_mlp * selective
    head_rows = sequence if work.head_at_every_position else labelled_tokens_per_sample
    extra_head = 2 * head_row * (head_rows - labelled_tokens_per_sample)
    # stock's ViT: its layers recomputed and backpropagated (down to the embeddings'
    # output, which XTuner makes require gradients), and the projector recomputed
    vit_extra = (
        (vit_linear + vit_attention) + (vit_linear + 2 * vit_attention) + projector if work.vit_backward else 0.0
    )
    return StepFlops(samples * model, samples * (model + recomputed + extra_head + vit_extra), sequence)


# Dense bf16/fp16 tensor-core peaks in TFLOP/s (vendor datasheets, without sparsity).
# Matched in order against the GPU's name, so the more specific names come first.
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200", 989.0),
    ("GH200", 989.0),
    ("H100", 989.0),  # SXM / HBM3
    ("H800", 989.0),
    ("H20", 148.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("A10G", 70.0),
    ("B200", 2250.0),
)


def peak_tflops(gpu_name: str | None) -> float | None:
    if not gpu_name:
        return None
    for fragment, peak in PEAK_TFLOPS:
        if fragment in gpu_name:
            return peak
    return None
