"""A tiny synthetic layout with the exact folder structure of the real one.

It lets the whole pipeline (validate -> render -> real XTuner training -> verdict)
run on any machine in seconds. The models are random but tiny; the captions are a
function of what each image shows (shape, its colour, the background colour), so
the projector has something real to learn and the loss falls.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from bench.criteria import Criteria
from bench.layout import Layout

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 60),
    "blue": (30, 60, 220),
    "yellow": (235, 220, 40),
    "black": (10, 10, 10),
    "white": (245, 245, 245),
}
SHAPES = ("square", "circle", "triangle")
# Human turns as in LLaVA-Pretrain: an instruction with the <image> placeholder.
PROMPTS = (
    "Describe the image concisely.\n<image>",
    "<image>\nWrite a short caption for this picture.",
    "What does this image show?\n<image>",
)
SPECIAL_TOKENS = ["<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
IMAGE_PIXELS = 64  # JPEG side; the image processor resizes to VISION_IMAGE_SIZE
VISION_IMAGE_SIZE = 28
VISION_PATCH_SIZE = 14


@dataclass(frozen=True)
class SynthSpec:
    """What to generate. ``samples`` must give XTuner's warm-up at least one iteration."""

    samples: int = 1024
    seed: int = 0
    vocab_size: int = 400
    llm_hidden: int = 64
    llm_layers: int = 2
    vision_hidden: int = 32
    vision_layers: int = 3


def _draw(shape: str, fg: tuple, bg: tuple, rng: random.Random):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (IMAGE_PIXELS, IMAGE_PIXELS), bg)
    draw = ImageDraw.Draw(image)
    size = rng.randint(28, 48)
    x0 = rng.randint(0, IMAGE_PIXELS - size)
    y0 = rng.randint(0, IMAGE_PIXELS - size)
    box = (x0, y0, x0 + size, y0 + size)
    if shape == "square":
        draw.rectangle(box, fill=fg)
    elif shape == "circle":
        draw.ellipse(box, fill=fg)
    else:
        draw.polygon([(x0, y0 + size), (x0 + size // 2, y0), (x0 + size, y0 + size)], fill=fg)
    return image


def _write_dataset(layout: Layout, spec: SynthSpec, rng: random.Random) -> list[str]:
    """Images under ``images/<dir>/<file>.jpg`` and the JSON in LLaVA-Pretrain's record format."""
    records, captions = [], []
    names = list(COLOURS)
    for index in range(spec.samples):
        shape = rng.choice(SHAPES)
        fg, bg = rng.sample(names, 2)
        caption = f"a {fg} {shape} on a {bg} background"
        sample_id = f"{index:09d}"
        rel = f"{sample_id[:5]}/{sample_id}.jpg"
        path = layout.image_folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        _draw(shape, COLOURS[fg], COLOURS[bg], rng).save(path, quality=95)
        records.append(
            {
                "id": sample_id,
                "image": rel,
                "conversations": [
                    {"from": "human", "value": rng.choice(PROMPTS)},
                    {"from": "gpt", "value": caption},
                ],
            }
        )
        captions.append(caption)
    layout.dataset_json.write_text(json.dumps(records))
    return captions


def _write_tokenizer(directory: Path, corpus: list[str], vocab_size: int):
    """A byte-level BPE trained on the captions and the chat template's words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    template_words = ["system\n", "user\n", "assistant\n", *PROMPTS]
    tokenizer.train_from_iterator(corpus + template_words, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="</s>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    wrapped.save_pretrained(directory)
    return wrapped


def _write_llm(directory: Path, tokenizer, spec: SynthSpec) -> None:
    """A random Llama-architecture LLM (InternLM2-20B is Llama-shaped)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.llm_hidden,
        intermediate_size=spec.llm_hidden * 2,
        num_hidden_layers=spec.llm_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rope_theta=1_000_000.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(directory, safe_serialization=True)


def _write_clip(directory: Path, spec: SynthSpec) -> None:
    """A random CLIP vision tower plus its image processor."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_hidden * 2,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=2,
        image_size=VISION_IMAGE_SIZE,
        patch_size=VISION_PATCH_SIZE,
        projection_dim=spec.vision_hidden,
    )
    CLIPVisionModel(config).save_pretrained(directory, safe_serialization=True)
    CLIPImageProcessor(
        size={"shortest_edge": VISION_IMAGE_SIZE},
        crop_size={"height": VISION_IMAGE_SIZE, "width": VISION_IMAGE_SIZE},
    ).save_pretrained(directory)


def write_synthetic_layout(root: str | Path, spec: SynthSpec = SynthSpec()) -> Layout:
    """Write the layout under ``root`` (created if missing); the same spec gives the same bytes."""
    import torch

    layout = Layout.at(root)
    if layout.dataset_json.exists() or layout.llm_dir.exists() or layout.clip_dir.exists():
        raise FileExistsError(f"{layout.root} already holds a layout; choose an empty folder")
    layout.pretrain_dir.mkdir(parents=True, exist_ok=True)
    layout.model_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(spec.seed)
    captions = _write_dataset(layout, spec, rng)
    tokenizer = _write_tokenizer(layout.llm_dir, captions, spec.vocab_size)
    torch.manual_seed(spec.seed)
    _write_llm(layout.llm_dir, tokenizer, spec)
    _write_clip(layout.clip_dir, spec)
    return layout


# Demo criteria for the synthetic layout (`llava-bench demo`). Only the projector
# trains, in front of a random frozen LLM, so the loss starts near ln(vocab) ~ 6 and
# falls slowly; the target is set from measured runs of this exact layout (seed 0,
# 60 steps of batch 8 on CPU) so a healthy machine passes with margin. It proves the
# pipeline works, nothing about hardware.
DEMO_SAMPLES = 1024
DEMO_PER_DEVICE_BATCH = 8
DEMO_CRITERIA = Criteria(target_loss=5.87, max_steps=60)
