"""XTuner's LLaVAModel with the levers that change where work is done, not what is computed.

Named in the rendered config (bench/recipe/render.py) only when one of these levers is on, so
the stock recipe builds XTuner's own class. Imports XTuner: only the trainer
processes load this module.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint
from xtuner.model import LLaVAModel
from xtuner.utils import IGNORE_INDEX

from bench.trainer.startup import note


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
    - ``labelled_logits_only``: the loss's logits only at the positions that have a
      label. The LLM computes 92,544 logits in fp32 for every position, image tokens
      included, and the loss reads only the caption's; each row of the output
      projection is computed on its own, so the loss is the same mean over the same
      terms.
    """

    def __init__(
        self,
        *args,
        skip_vit_backward: bool = False,
        unchecked_llm_layers: int = 0,
        labelled_logits_only: bool = False,
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
        if unchecked_llm_layers:
            layers = self.llm.model.layers  # Llama and InternLM2 alike
            self.llm.gradient_checkpointing_disable()
            for layer in layers[: max(0, len(layers) - unchecked_llm_layers)]:
                layer.forward = _checkpointed(layer.forward)
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


def _checkpointed(forward):
    """``forward`` recomputed in the backward pass. Non-reentrant, because decoder
    layers take keyword arguments; it recomputes the same forward as the reentrant
    checkpoint the stock recipe uses."""

    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run
