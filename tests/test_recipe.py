"""The rendered XTuner config: faithful math, the recorded changes, each variant."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from bench.layout import Layout
from bench.recipe import RecipeOptions, from_user_config, referenced_paths, render

LAYOUT = Layout.at("/llava")


def settings(text: str) -> dict:
    """Top-level constant assignments of a config."""
    values = {}
    for statement in ast.parse(text).body:
        if isinstance(statement, ast.Assign) and isinstance(statement.targets[0], ast.Name):
            try:
                values[statement.targets[0].id] = ast.literal_eval(statement.value)
            except ValueError:
                pass
    return values


def test_default_recipe_keeps_the_pinned_hyperparameters():
    text = render(LAYOUT, RecipeOptions(), "test").text
    values = settings(text)
    assert values["batch_size"] == 32
    assert values["accumulative_counts"] == 1
    assert values["dataloader_num_workers"] == 0
    assert "pin_memory" not in text and "from_pretrained_dequantized" not in text  # stock levers
    assert values["lr"] == 1e-3
    assert values["betas"] == (0.9, 0.999)
    assert values["weight_decay"] == 0
    assert values["max_norm"] == 1
    assert values["warmup_ratio"] == 0.03
    assert values["max_epochs"] == 1
    assert values["max_iters"] == 500
    assert "max_length = int(2048 - (336 / 14)**2)" in text
    assert "quantization_config=nf4_quantization" in text
    assert "bnb_4bit_quant_type='nf4'" in text and "bnb_4bit_use_double_quant=True" in text
    assert "torch_dtype=torch.float16" in text
    assert "type=AmpOptimWrapper" in text and "loss_scale='dynamic'" in text
    assert "train_cfg = dict(type=TrainLoop, max_iters=max_iters)" in text
    assert text.count("convert_to_iter_based=True") == 2  # schedule stays the full epoch
    assert "dict(type=ThroughputHook)" in text
    assert "EvaluateChatHook, tokenizer" not in text  # offline: no URL image
    assert "checkpoint=None" in text
    assert "randomness = dict(seed=42, deterministic=False)" in text
    assert "backend='nccl'" in text


def test_paths_are_absolute_into_the_layout():
    text = render(LAYOUT, RecipeOptions(), "test").text
    assert referenced_paths(text) == {
        "llm_name_or_path": "/llava/model/internlm2-chat-20b",
        "visual_encoder_name_or_path": "/llava/model/clip-vit-large-patch14-336",
        "data_path": "/llava/data/llava_data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json",
        "image_folder": "/llava/data/llava_data/LLaVA-Pretrain/images",
    }


def test_bf16_drops_quantization():
    recipe = render(LAYOUT, RecipeOptions(precision="bf16"), "test")
    assert "quantization_config=None" in recipe.text
    assert "torch_dtype=torch.bfloat16" in recipe.text
    assert any("bf16" in d for d in recipe.deviations)


def test_cpu_variant_uses_fp32_plain_optimizer_and_gloo():
    recipe = render(LAYOUT, RecipeOptions(device="cpu"), "test")
    assert "torch_dtype=torch.float32" in recipe.text
    assert "type=OptimWrapper" in recipe.text and "loss_scale" not in recipe.text
    assert "backend='gloo'" in recipe.text
    assert "is_bf16_supported" in recipe.text


def test_options_are_rendered_and_recorded():
    options = RecipeOptions(max_steps=100, accumulative_counts=4, per_device_batch=16, seed=7,
                            save_checkpoint=True, eval_image=Path("/llava/view.jpg"))  # fmt: skip
    recipe = render(LAYOUT, options, "test")
    values = settings(recipe.text)
    assert (values["max_iters"], values["accumulative_counts"], values["batch_size"]) == (400, 4, 16)
    assert "dict(type=CheckpointHook" in recipe.text
    assert "evaluation_images='/llava/view.jpg'" in recipe.text
    for words in ("seed 7", "100 optimizer steps", "per-device batch 16", "accumulation over 4", "checkpoints every 500"):
        assert any(words in d for d in recipe.deviations), words


def test_rendering_is_deterministic():
    assert render(LAYOUT, RecipeOptions(), "v").sha256 == render(LAYOUT, RecipeOptions(), "v").sha256


@pytest.mark.parametrize("bad", [dict(precision="int8"), dict(device="tpu"), dict(max_steps=0)])
def test_bad_options_are_refused(bad):
    with pytest.raises(ValueError):
        RecipeOptions(**bad)


def test_user_config_is_used_as_written_with_stop_and_seed_as_cfg_options(tmp_path):
    config = tmp_path / "user.py"
    config.write_text("train_cfg = dict(max_epochs=1)\n")
    recipe = from_user_config(config, RecipeOptions(max_steps=50, seed=3))
    assert recipe.source == "user"
    assert recipe.text == "train_cfg = dict(max_epochs=1)\n"
    assert recipe.cfg_options == ["train_cfg.max_epochs=None", "train_cfg.max_iters=50", "randomness.seed=3"]
