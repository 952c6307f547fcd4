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

import importlib.util
import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.criteria import Criteria
from bench.flops import CLIP_VIT_L_336, INTERNLM2_20B, LLMShape
from bench.inputs import llm_shape
from bench.layout import SYNTHETIC_MARKER_NAME, Layout

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
# InternLM2's model code, named by the real folder's config.json (auto_map).
INTERNLM2_CODE_FILES = ("configuration_internlm2.py", "modeling_internlm2.py")
SPECIAL_TOKENS = ["<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
IMAGE_PIXELS = 64  # JPEG side; the image processor resizes to VISION_IMAGE_SIZE
VISION_IMAGE_SIZE = 28
VISION_PATCH_SIZE = 14


# Demo criteria for the synthetic layout (`llava-bench demo`), set from measured
# runs of this layout (seed 0, batch 8, one CPU process, the tiny InternLM2): the
# first logged loss is 1.22 (steps 1-10, the projector barely trained), the loss
# crosses 0.6 near step 50 and 200 steps end near 0.14. The target sits between, so
# a healthy machine passes with margin and a broken projector update fails. It
# proves the pipeline works, nothing about hardware.
DEMO_SAMPLES = 2048
DEMO_PER_DEVICE_BATCH = 8
DEMO_CRITERIA = Criteria(target_loss=0.6, max_steps=200)


@dataclass(frozen=True)
class SynthSpec:
    """What to generate. ``samples`` must give XTuner's warm-up at least one iteration."""

    samples: int = DEMO_SAMPLES
    seed: int = 0
    vocab_size: int = 400
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


@dataclass(frozen=True)
class Sample:
    prompt: str  # the human turn, with <image>
    caption: str  # the gpt turn
    words: tuple[str, str, str, str]  # what the four image quadrants show, in patch order


def _write_dataset(layout: Layout, spec: SynthSpec, rng: random.Random) -> list[Sample]:
    """Images under ``images/<dir>/<file>.jpg`` and the JSON in LLaVA-Pretrain's record format."""
    records, samples = [], []
    names = list(COLOURS)
    for index in range(spec.samples):
        shape = rng.choice(SHAPES)
        fg, bg = rng.sample(names, 2)
        sample = Sample(rng.choice(PROMPTS), f"a {fg} {shape} on a {bg} background", (fg, shape, bg, fg))
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
    tokenizer.train_from_iterator([*corpus, *template_words], trainer=trainer)
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


def _chat_example(tokenizer, sample: Sample) -> tuple[list[int], list[int]]:
    """Token ids and labels laid out as XTuner lays out a LLaVA sample with the
    internlm2_chat template, the image slot holding the words the image shows."""

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    question = sample.prompt.replace("<image>", "").strip()
    image_slot = [encode(" " + word)[0] for word in sample.words]
    prompt = [
        tokenizer.bos_token_id,
        *encode("<|im_start|>user\n"),
        *image_slot,
        *encode(f"\n{question}<|im_end|>\n<|im_start|>assistant\n"),
    ]
    answer = encode(sample.caption + "<|im_end|>")
    return prompt + answer, [-100] * len(prompt) + answer


def _train_llm(model, tokenizer, samples: list[Sample], spec: SynthSpec) -> None:
    """Teach the tiny LLM to caption from the image slot; seconds on one CPU thread."""
    import torch

    examples = [_chat_example(tokenizer, sample) for sample in samples]
    width = max(len(ids) for ids, _ in examples)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([i + [pad] * (width - len(i)) for i, _ in examples])
    labels = torch.tensor([label + [-100] * (width - len(label)) for _, label in examples])
    mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in examples])
    generator = torch.Generator().manual_seed(spec.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(spec.llm_train_steps):
        batch = torch.randint(len(examples), (32,), generator=generator)
        loss = model(input_ids=ids[batch], attention_mask=mask[batch], labels=labels[batch]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def internlm2_code_folder() -> Path | None:
    """InternLM2's model code as the installed xtuner ships it (``xtuner/_lite/modelings/
    internlm2/``, xtuner >= 0.2.0), found without importing xtuner; None where absent
    (the pinned commit 770bac38 predates it)."""
    spec = importlib.util.find_spec("xtuner")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "_lite" / "modelings" / "internlm2"
    return folder if all((folder / name).is_file() for name in INTERNLM2_CODE_FILES) else None


def internlm2_config(shape: LLMShape, tokenizer, torch_dtype: str) -> dict:
    """config.json as the real internlm2-chat-20b folder has it, for ``shape``: the
    model's own code through auto_map, its eager attention, dynamic RoPE scaling."""
    return {
        "architectures": ["InternLM2ForCausalLM"],
        "attn_implementation": "eager",
        "auto_map": {
            "AutoConfig": "configuration_internlm2.InternLM2Config",
            "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
            "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
        },
        "bias": False,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "hidden_act": "silu",
        "hidden_size": shape.hidden,
        "initializer_range": 0.02,
        "intermediate_size": shape.ffn,
        "max_position_embeddings": 32_768,
        "model_type": "internlm2",
        "num_attention_heads": shape.heads,
        "num_hidden_layers": shape.layers,
        "num_key_value_heads": shape.kv_heads,
        "pad_token_id": tokenizer.pad_token_id,
        "rms_norm_eps": 1e-5,
        "rope_scaling": {"type": "dynamic", "factor": 2.0},
        "rope_theta": 1_000_000,
        "tie_word_embeddings": False,
        "torch_dtype": torch_dtype,
        "use_cache": True,
        "vocab_size": shape.vocab,
    }


def _new_llm(directory: Path, shape: LLMShape, tokenizer, dtype):
    """A random LLM of ``shape`` whose folder is laid out as the real one: InternLM2 with
    its own code, copied from the installed xtuner. Where that code is missing or does
    not import with the installed transformers, a Llama of the same shape stands in
    (the same dimensions; Llama's own attention and names); the second value says why.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    dtype_name = str(dtype).removeprefix("torch.")
    code = internlm2_code_folder()
    if code is not None:
        directory.mkdir(parents=True, exist_ok=True)
        for name in INTERNLM2_CODE_FILES:
            shutil.copyfile(code / name, directory / name)
        (directory / "config.json").write_text(
            json.dumps(internlm2_config(shape, tokenizer, dtype_name), indent=2) + "\n"
        )
        try:
            config = AutoConfig.from_pretrained(directory, trust_remote_code=True)
            return AutoModelForCausalLM.from_config(config, trust_remote_code=True, torch_dtype=dtype), None
        except ImportError as error:
            why = f"the installed xtuner's InternLM2 code does not import here ({error})"
            for name in (*INTERNLM2_CODE_FILES, "config.json"):
                (directory / name).unlink()
    else:
        why = "the installed xtuner does not ship InternLM2's model code (xtuner/_lite/modelings/internlm2)"
    config = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.ffn,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=32_768,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        torch_dtype=dtype_name,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM._from_config(config, torch_dtype=dtype), why


def _save_llm(model, directory: Path, tokenizer, **save_options) -> None:
    """Weights in safetensors; for InternLM2 the config.json written anew as the real
    folder's (save_pretrained would add this folder's absolute path to it)."""
    model.save_pretrained(directory, safe_serialization=True, **save_options)
    if model.config.model_type == "internlm2":
        config = internlm2_config(llm_shape(model.config.to_dict()), tokenizer, str(model.dtype).removeprefix("torch."))
        (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _write_llm(directory: Path, tokenizer, samples: list[Sample], spec: SynthSpec) -> str | None:
    """A tiny LLM of the real folder's architecture that captions from the image slot;
    the stand-in's reason, or None."""
    import torch

    shape = LLMShape(
        hidden=spec.llm_hidden,
        layers=spec.llm_layers,
        heads=4,
        kv_heads=2,
        ffn=spec.llm_hidden * 2,
        vocab=len(tokenizer),
    )
    model, why = _new_llm(directory, shape, tokenizer, torch.float32)
    _train_llm(model, tokenizer, samples, spec)
    _save_llm(model, directory, tokenizer)
    return why


def _tiny_vision_config(spec: SynthSpec):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_hidden * 2,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=2,
        image_size=VISION_IMAGE_SIZE,
        patch_size=VISION_PATCH_SIZE,
        projection_dim=spec.vision_hidden,
    )


def _write_clip(directory: Path, config) -> None:
    """A random CLIP vision tower plus the image processor of its input size."""
    from transformers import CLIPImageProcessor, CLIPVisionModel

    size = config.image_size
    CLIPVisionModel(config).save_pretrained(directory, safe_serialization=True)
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(
        directory
    )


def _start_layout(root: str | Path, spec: SynthSpec):
    """An empty layout's folders, the dataset and the tokenizer; refuses an existing layout."""
    layout = Layout.at(root)
    if layout.dataset_json.exists() or layout.llm_dir.exists() or layout.clip_dir.exists():
        raise FileExistsError(f"{layout.root} already holds a layout; choose an empty folder")
    layout.pretrain_dir.mkdir(parents=True, exist_ok=True)
    layout.model_dir.mkdir(parents=True, exist_ok=True)
    samples = _write_dataset(layout, spec, random.Random(spec.seed))
    tokenizer = _write_tokenizer(layout.llm_dir, [s.caption for s in samples], spec.vocab_size)
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
        stand_in = _write_llm(layout.llm_dir, tokenizer, samples, spec)
        _write_clip(layout.clip_dir, _tiny_vision_config(spec))
    finally:
        torch.set_num_threads(threads)
    _mark_synthetic(layout, spec, random_weights=False, llm_stand_in=stand_in)
    return layout


# Speed measurements on the real shapes (`llava-bench perf`): images of LLaVA-Pretrain's
# size, so decoding costs what it costs there (perf sets the record count: the records
# reuse the images in turn).
REAL_SHAPE_SPEC = SynthSpec(samples=2_048, vocab_size=2_000, image_pixels=384)


def write_real_shape_layout(root: str | Path, spec: SynthSpec = REAL_SHAPE_SPEC, device: str = "cuda") -> Layout:
    """Random weights of the exact InternLM2-20B and CLIP ViT-L/14-336 shapes, for time
    per step and memory on a GPU machine with nothing downloaded.

    The LLM is made in bf16 on the GPU (40 GB; the real folder's dtype) with InternLM2's
    own code and saved in shards; its loss means nothing, but stock and appliance recipes
    compute the same loss on it.
    """
    import torch
    from transformers import CLIPVisionConfig

    layout, _, tokenizer = _start_layout(root, spec)
    torch.manual_seed(spec.seed)
    with torch.device(device):
        model, stand_in = _new_llm(layout.llm_dir, INTERNLM2_20B, tokenizer, torch.bfloat16)
    _save_llm(model, layout.llm_dir, tokenizer, max_shard_size="4GB")
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
    _write_clip(layout.clip_dir, vision)
    _mark_synthetic(layout, spec, random_weights=True, llm_stand_in=stand_in)
    return layout
