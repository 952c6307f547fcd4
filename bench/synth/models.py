"""The synthetic layout's model folders: a tiny InternLM2 with the model's own code (the
real folder's file set), trained to copy the image slot's words into the caption; its
tokenizer; a tiny CLIP; and the same writers at the real shapes (bench/synth/writer.py)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

from bench.core.inputs import llm_shape
from bench.core.shapes import LLMShape
from bench.synth.spec import Sample, SynthSpec

# Human turns as in LLaVA-Pretrain: a short instruction of a few words with the <image>
# placeholder before or after it.
PROMPTS = (
    "Describe the image concisely.\n<image>",
    "<image>\nWrite a short caption for this picture.",
    "What does this image show?\n<image>",
    "<image>\nGive a brief description of the picture.",
    "Summarize the visual content of the image.\n<image>",
)

# InternLM2's model code, named by the real folder's config.json (auto_map).
INTERNLM2_CODE_FILES = ("configuration_internlm2.py", "modeling_internlm2.py")

SPECIAL_TOKENS = ["<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]

VISION_IMAGE_SIZE = 28

VISION_PATCH_SIZE = 14


def write_tokenizer(directory: Path, corpus: list[str], vocab_size: int):
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


def new_llm(directory: Path, shape: LLMShape, tokenizer, dtype):
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


def save_llm(model, directory: Path, tokenizer, **save_options) -> None:
    """Weights in safetensors; for InternLM2 the config.json written anew as the real
    folder's (save_pretrained would add this folder's absolute path to it), and the code
    copied again from the installed xtuner: save_pretrained copies it from transformers'
    module cache, which any process that loads another folder of this name rewrites."""
    model.save_pretrained(directory, safe_serialization=True, **save_options)
    if model.config.model_type == "internlm2":
        config = internlm2_config(llm_shape(model.config.to_dict()), tokenizer, str(model.dtype).removeprefix("torch."))
        (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for name in INTERNLM2_CODE_FILES:
            shutil.copyfile(internlm2_code_folder() / name, directory / name)


def write_llm(directory: Path, tokenizer, samples: list[Sample], spec: SynthSpec) -> str | None:
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
    model, why = new_llm(directory, shape, tokenizer, torch.float32)
    _train_llm(model, tokenizer, samples, spec)
    save_llm(model, directory, tokenizer)
    return why


def tiny_vision_config(spec: SynthSpec):
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


def write_clip(directory: Path, config) -> None:
    """A random CLIP vision tower plus the image processor of its input size."""
    from transformers import CLIPImageProcessor, CLIPVisionModel

    size = config.image_size
    CLIPVisionModel(config).save_pretrained(directory, safe_serialization=True)
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(
        directory
    )
