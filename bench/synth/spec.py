"""What a synthetic layout is made of: the spec of what to generate and the samples
drawn from it, shared by the layout writer (bench/synth/writer.py) and the model writer
(bench/synth/models.py), which trains the tiny LLM on the samples."""

from __future__ import annotations

from dataclasses import dataclass

from bench.core.statuses import Criteria

DEMO_SAMPLES = 2048
IMAGE_PIXELS = 64  # JPEG side; the image processor resizes to VISION_IMAGE_SIZE


# Demo criteria for the synthetic layout (`llava-bench demo`), set from measured
# runs of this layout (seed 0, batch 8, one CPU process, the tiny InternLM2): the
# first logged loss is 0.645 (steps 1-10, the projector barely trained), the loss
# crosses 0.2 near step 70 and 200 steps end near 0.06. The target sits between, so
# a healthy machine passes with margin and a broken projector update fails. It
# proves the pipeline works, nothing about hardware.
DEMO_PER_DEVICE_BATCH = 8
DEMO_CRITERIA = Criteria(target_loss=0.2, max_steps=200)


@dataclass(frozen=True)
class SynthSpec:
    """What to generate. ``samples`` must give XTuner's warm-up at least one iteration."""

    samples: int = DEMO_SAMPLES
    seed: int = 0
    vocab_size: int = 1000  # more than the captions' words need: each word is one token
    llm_hidden: int = 64
    llm_layers: int = 2
    llm_train_steps: int = 300
    vision_hidden: int = 32
    vision_layers: int = 3
    image_pixels: int = IMAGE_PIXELS
    # JSON records; None: one per image. More records than images reuse the images in
    # turn, to time start-up with LLaVA-Pretrain's 558,128 records without writing as
    # many images.
    records: int | None = None
    # How many times LLaVA-Pretrain's text a record carries (SENTENCES_PER_SCALE): 1, or
    # more for the memory model's edge (`llava-bench perf --caption-scale 3`).
    caption_scale: int = 1


# Speed measurements on the real shapes (`llava-bench perf`): images of LLaVA-Pretrain's
# size, so decoding costs what it costs there (perf sets the record count: the records
# reuse the images in turn).
REAL_SHAPE_SPEC = SynthSpec(samples=2_048, vocab_size=2_000, image_pixels=384)


@dataclass(frozen=True)
class Sample:
    prompt: str  # the human turn, with <image>
    caption: str  # the gpt turn
    words: tuple[str, str, str, str]  # what the four image quadrants show, in patch order
