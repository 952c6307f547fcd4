"""A tiny synthetic layout with the exact folder structure of the real one.

It lets the whole pipeline (validate -> render -> real XTuner training -> verdict)
run on any machine in seconds, and makes the loss fall for the same reason it falls
in LLaVA pretraining: the projector learns to turn image features into what the
frozen LLM reads as words.

- Each image shows its caption's words, one per quadrant, and each quadrant is one
  ViT patch: foreground colour, the shape, background colour, foreground colour.
- The LLM is a tiny InternLM2 with the model's own code (the folder is laid out as the
  real one), trained here for a few seconds on the chat template with the caption's
  words as the four "image" embeddings, so it has learned to copy what the image slot
  says into the caption. The benchmark freezes it, as in the recipe.
- Until the projector maps patch features onto those word embeddings, the caption's
  words are guesses; once it does, the loss drops.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict
from pathlib import Path

from bench.core.layout import SYNTHETIC_MARKER_NAME, Layout
from bench.core.shapes import CLIP_VIT_L_336, INTERNLM2_20B
from bench.synth.models import (
    PROMPTS,
    new_llm,
    save_llm,
    tiny_vision_config,
    write_clip,
    write_llm,
    write_tokenizer,
)
from bench.synth.spec import IMAGE_PIXELS, REAL_SHAPE_SPEC, Sample, SynthSpec

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 60),
    "blue": (30, 60, 220),
    "yellow": (235, 220, 40),
    "black": (10, 10, 10),
    "white": (245, 245, 245),
}
SHAPES = ("square", "circle", "triangle")
# Caption tails, BLIP-style, by what the image shows, so the captions' lengths vary as
# LLaVA-Pretrain's do and the tiny LLM can still learn each caption from its image. With
# the prompts (bench/synth/models.py) and the internlm2_chat template a record is 36.0
# text tokens on average (35 median, 49 at most), and a micro-batch of 32 pads to 47.2
# (its longest sample: 45 to 49 in 8 of 10 micro-batches; 44.1 at batch 8), against
# LLaVA-Pretrain's 46, 48 and 54 in the seed's A100 lines (XTuner's tokens_per_sec x time
# / 32: the padded text of one micro-batch of 32, its image placeholder included). The
# captions' labelled tokens: 17.0 a sample.
FOREGROUND_TAILS = {
    "red": "",
    "green": "",
    "blue": ", a clean minimal icon for a website or an app",
    "yellow": " drawn in bright paint",
    "black": "",
    "white": ", small",
}
SHAPE_TAILS = {"square": ", with sharp corners", "circle": ", centered in the frame", "triangle": " pointing upward"}
BACKGROUND_TAILS = {
    "red": " with a thin border",
    "green": " with soft shadows",
    "blue": " in soft light",
    "yellow": "",
    "black": ", simple flat vector art",
    "white": "",
}
# A long-caption layout (``caption_scale`` above 1) adds this many sentences a unit of
# scale: three times the text at scale 3 (147.2 text tokens padded at batch 32).
SENTENCES_PER_SCALE = 5


def _draw(shape: str, fg: tuple, bg: tuple, rng: random.Random, pixels: int):
    """Quadrants: foreground fill, the shape in white on black, background fill, foreground fill."""
    from PIL import Image, ImageDraw

    half = pixels // 2

    def jitter(colour):
        return tuple(min(255, max(0, c + rng.randint(-12, 12))) for c in colour)

    image = Image.new("RGB", (pixels, pixels))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, half - 1, half - 1), fill=jitter(fg))
    draw.rectangle((0, half, half - 1, pixels - 1), fill=jitter(bg))
    draw.rectangle((half, half, pixels - 1, pixels - 1), fill=jitter(fg))
    draw.rectangle((half, 0, pixels - 1, half - 1), fill=(0, 0, 0))
    size = rng.randint(18, 28) * pixels // IMAGE_PIXELS
    x0, y0 = half + rng.randint(0, half - size), rng.randint(0, half - size)
    box = (x0, y0, x0 + size, y0 + size)
    if shape == "square":
        draw.rectangle(box, fill=(255, 255, 255))
    elif shape == "circle":
        draw.ellipse(box, fill=(255, 255, 255))
    else:
        draw.polygon([(x0, y0 + size), (x0 + size // 2, y0), (x0 + size, y0 + size)], fill=(255, 255, 255))
    return image


def caption(fg: str, shape: str, bg: str, scale: int = 1) -> str:
    """What the image shows, with its tails; at a scale above 1, sentences that say it again."""
    first = f"a {fg} {shape}{FOREGROUND_TAILS[fg]} on a {bg} background{SHAPE_TAILS[shape]}{BACKGROUND_TAILS[bg]}"
    again = [f"the {shape} is {fg} and the background is {bg}"] * ((scale - 1) * SENTENCES_PER_SCALE)
    return ". ".join([first, *again])


def _write_dataset(layout: Layout, spec: SynthSpec, rng: random.Random) -> list[Sample]:
    """Images under ``images/<dir>/<file>.jpg`` and the JSON in LLaVA-Pretrain's record format."""
    records, samples = [], []
    names = list(COLOURS)
    for index in range(spec.samples):
        shape = rng.choice(SHAPES)
        fg, bg = rng.sample(names, 2)
        sample = Sample(rng.choice(PROMPTS), caption(fg, shape, bg, spec.caption_scale), (fg, shape, bg, fg))
        sample_id = f"{index:09d}"
        rel = f"{sample_id[:5]}/{sample_id}.jpg"
        path = layout.image_folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        _draw(shape, COLOURS[fg], COLOURS[bg], rng, spec.image_pixels).save(path, quality=95)
        records.append(
            {
                "id": sample_id,
                "image": rel,
                "conversations": [
                    {"from": "human", "value": sample.prompt},
                    {"from": "gpt", "value": sample.caption},
                ],
            }
        )
        samples.append(sample)
    for index in range(len(records), spec.records or 0):
        records.append({**records[index % spec.samples], "id": f"{index:09d}"})
    layout.dataset_json.write_text(json.dumps(records))
    return samples


def _start_layout(root: str | Path, spec: SynthSpec):
    """An empty layout's folders, the dataset and the tokenizer; refuses an existing layout."""
    layout = Layout.at(root)
    # Writes only where nothing is: images or model files already there are someone's.
    held = [folder for folder in (layout.data_dir, layout.model_dir) if folder.is_dir() and any(folder.iterdir())]
    if held:
        raise FileExistsError(
            f"{layout.root} already holds a layout or part of one ({', '.join(map(str, held))} not empty); "
            "choose an empty folder"
        )
    layout.pretrain_dir.mkdir(parents=True, exist_ok=True)
    layout.model_dir.mkdir(parents=True, exist_ok=True)
    samples = _write_dataset(layout, spec, random.Random(spec.seed))
    # Trained on the long captions' sentences too, so that every scale's words are whole
    # tokens and layouts of any scale may share one model folder (--models-from).
    corpus = [text for s in samples for text in (s.caption, caption(*s.words[:3], scale=2))]
    tokenizer = write_tokenizer(layout.llm_dir, corpus, spec.vocab_size)
    return layout, samples, tokenizer


def _mark_synthetic(layout: Layout, spec: SynthSpec, random_weights: bool, llm_stand_in: str | None) -> None:
    """The marker that tells deep checks (and readers) the models are not the real ones,
    and why the LLM is a Llama stand-in where it is one."""
    record = {"synthetic": True, "random_weights": random_weights, "llm_stand_in": llm_stand_in, **asdict(spec)}
    (layout.clip_dir / SYNTHETIC_MARKER_NAME).write_text(json.dumps(record, indent=2) + "\n")


def write_synthetic_layout(root: str | Path, spec: SynthSpec = SynthSpec()) -> Layout:
    """Write the layout under ``root`` (created if missing); the same spec gives the same bytes."""
    import torch

    layout, samples, tokenizer = _start_layout(root, spec)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same seed gives the same bytes
    try:
        torch.manual_seed(spec.seed)
        stand_in = write_llm(layout.llm_dir, tokenizer, samples, spec)
        write_clip(layout.clip_dir, tiny_vision_config(spec))
    finally:
        torch.set_num_threads(threads)
    _mark_synthetic(layout, spec, random_weights=False, llm_stand_in=stand_in)
    return layout


def write_real_shape_layout(
    root: str | Path, spec: SynthSpec = REAL_SHAPE_SPEC, device: str = "cuda", models_from: Path | None = None
) -> Layout:
    """Random weights of the exact InternLM2-20B and CLIP ViT-L/14-336 shapes, for time
    per step and memory on a GPU machine with nothing downloaded.

    The LLM is made in bf16 on the GPU (40 GB; the real folder's dtype) with InternLM2's
    own code and saved in shards; its loss means nothing, but stock and appliance recipes
    compute the same loss on it. ``models_from``: another such layout whose model
    folders are hard-linked instead (its tokenizer has every scale's words), so that a
    long-caption layout costs the disk only its dataset.
    """
    import torch
    from transformers import CLIPVisionConfig

    if models_from is not None:
        layout, _, _ = _start_layout(root, spec)
        for folder in (layout.llm_dir, layout.clip_dir):
            shutil.rmtree(folder, ignore_errors=True)
        source = Layout.at(models_from)
        for here, there in ((layout.llm_dir, source.llm_dir), (layout.clip_dir, source.clip_dir)):
            shutil.copytree(there, here, copy_function=os.link, ignore=shutil.ignore_patterns(SYNTHETIC_MARKER_NAME))
        stand_in = json.loads((source.clip_dir / SYNTHETIC_MARKER_NAME).read_text())["llm_stand_in"]
        _mark_synthetic(layout, spec, random_weights=True, llm_stand_in=stand_in)
        return layout
    layout, _, tokenizer = _start_layout(root, spec)
    torch.manual_seed(spec.seed)
    with torch.device(device):
        model, stand_in = new_llm(layout.llm_dir, INTERNLM2_20B, tokenizer, torch.bfloat16)
    save_llm(model, layout.llm_dir, tokenizer, max_shard_size="4GB")
    del model
    torch.cuda.empty_cache()
    vit = CLIP_VIT_L_336
    vision = CLIPVisionConfig(
        hidden_size=vit.hidden,
        intermediate_size=vit.ffn,
        num_hidden_layers=vit.layers,
        num_attention_heads=16,
        image_size=vit.image_size,
        patch_size=vit.patch,
        projection_dim=768,
    )
    write_clip(layout.clip_dir, vision)
    _mark_synthetic(layout, spec, random_weights=True, llm_stand_in=stand_in)
    return layout
