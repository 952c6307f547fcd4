"""A deliberately broken lever, imported by the trainer in a test: XTuner's LLaVAModel
with the projector's gradients zeroed, so the projector never trains. perf's projector
check must fail it (tests/entrypoint/tools/test_perf.py)."""

from __future__ import annotations

import torch
from xtuner.model import LLaVAModel


class ZeroProjectorGradientLLaVAModel(LLaVAModel):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for parameter in self.projector.parameters():
            parameter.register_hook(torch.zeros_like)
