"""The model shapes the FLOP and memory models count with, and the real ones (InternLM2-20B,
CLIP ViT-L/14-336) the appliance's figures were measured on."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class LLMShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int

    @property
    def linear_params_per_layer(self) -> int:
        head_dim = self.hidden // self.heads
        qkv = self.hidden * (self.hidden + 2 * self.kv_heads * head_dim)
        out = self.hidden * self.hidden
        mlp = 3 * self.hidden * self.ffn  # gate, up, down
        return qkv + out + mlp


@dataclass(frozen=True)
class ViTShape:
    hidden: int
    layers: int
    ffn: int
    image_size: int
    patch: int

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch) ** 2

    @property
    def tokens(self) -> int:
        return self.patches + 1  # CLS; XTuner drops it before the projector


INTERNLM2_20B = LLMShape(hidden=6144, layers=48, heads=48, kv_heads=8, ffn=16384, vocab=92544)
CLIP_VIT_L_336 = ViTShape(hidden=1024, layers=24, ffn=4096, image_size=336, patch=14)


def are_real_shapes(model_shapes: dict | None) -> bool:
    """Whether recorded model shapes (inputs.model_shapes) are InternLM2-20B and ViT-L/14-336."""
    return model_shapes == {"llm": asdict(INTERNLM2_20B), "vit": asdict(CLIP_VIT_L_336)}


def against_real_shapes(model_shapes: dict) -> str:
    """ "real" where the model has the real shapes, "smaller" where none of its
    dimensions is larger (figures measured on the real shapes bound it), else "larger"."""
    if are_real_shapes(model_shapes):
        return "real"
    pairs = [(model_shapes[part], real) for part, real in (("llm", INTERNLM2_20B), ("vit", CLIP_VIT_L_336))]
    ratios = [part.get(f.name, 0) / getattr(real, f.name) for part, real in pairs for f in fields(real)]
    return "smaller" if all(ratio <= 1 for ratio in ratios) else "larger"
