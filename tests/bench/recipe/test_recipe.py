"""The rendered XTuner config: faithful math, the recorded changes, each variant."""

from __future__ import annotations

import ast
from dataclasses import replace
from pathlib import Path

import pytest

from bench.core.layout import Layout
from bench.recipe.config_facts import ConfigFacts, ConfigUnreadable, read_facts
from bench.recipe.render import (
    REFERENCE_GLOBAL_BATCH,
    RecipeOptions,
    from_user_config,
    global_batch_plan,
    render,
)
from tests.conftest import DATA

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
    assert read_facts(text).paths == {
        "llm": "/llava/model/internlm2-chat-20b",
        "tokenizer": "/llava/model/internlm2-chat-20b",
        "visual_encoder": "/llava/model/clip-vit-large-patch14-336",
        "image_processor": "/llava/model/clip-vit-large-patch14-336",
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
    # On CPU the rank timing runs on the clock, and the recorded change says so.
    assert "llava-bench RankTimingHook added: times each rank's forward pass (the clock)" in recipe.deviations
    gpu = render(LAYOUT, RecipeOptions(), "test").deviations
    assert any("forward pass (CUDA events, no synchronisation)" in change for change in gpu)


def test_the_float32_reference_computes_nf4_in_float32_and_trains_without_half_precision(tmp_path):
    """The math reference perf holds gradients against: the same quantized weights,
    every float in float32, DeepSpeed's ZeRO-2 config as XTuner ships it less its fp16
    and bf16 sections (XTuner turns their "auto" into bf16 on an H200), TF32 off."""
    import json

    from entrypoint.job.topology import detect
    from entrypoint.launch.plans import (
        DEEPSPEED_CONFIG,
        training_plan,
        write_float32_deepspeed_config,
        xtuner_train_script,
    )

    recipe = render(LAYOUT, RecipeOptions(float32_reference=True), "test")
    stock = render(LAYOUT, RecipeOptions(), "test")
    assert "torch_dtype=torch.float32" in recipe.text and "bnb_4bit_compute_dtype=torch.float32" in recipe.text
    assert (
        "bnb_4bit_compute_dtype=torch.float16" in stock.text and "quantization_config=nf4_quantization" in recipe.text
    )
    assert recipe.float32 and not stock.float32
    assert any("float32 reference" in change and "not a benchmark run" in change for change in recipe.deviations)
    written = json.loads(write_float32_deepspeed_config(tmp_path).read_text())
    shipped = json.loads(
        (xtuner_train_script().parent.parent / "configs" / "deepspeed" / f"{DEEPSPEED_CONFIG}.json").read_text()
    )
    assert {"fp16", "bf16"} <= set(shipped) and written == {
        k: v for k, v in shipped.items() if k not in ("fp16", "bf16")
    }
    assert written["zero_optimization"]["stage"] == 2
    topology = detect({}, 1)
    plan = training_plan(
        tmp_path / "config.py", tmp_path, tmp_path, tmp_path, "cuda", topology, [], tmp_path / "ds.json"
    )
    assert plan.argv[plan.argv.index("--deepspeed") + 1] == str(tmp_path / "ds.json")
    assert plan.env["NVIDIA_TF32_OVERRIDE"] == "0"
    usual = training_plan(tmp_path / "config.py", tmp_path, tmp_path, tmp_path, "cuda", topology)
    assert (
        usual.argv[usual.argv.index("--deepspeed") + 1] == DEEPSPEED_CONFIG and "NVIDIA_TF32_OVERRIDE" not in usual.env
    )


def test_the_float32_reference_takes_no_levers():
    from bench.recipe.levers import Levers

    with pytest.raises(ValueError, match="every lever off"):
        RecipeOptions(float32_reference=True, levers=Levers(skip_vit_backward=True))


def test_options_are_rendered_and_recorded():
    options = RecipeOptions(
        max_steps=100,
        accumulative_counts=4,
        per_device_batch=16,
        seed=7,
        save_checkpoint=True,
        eval_image=Path("/llava/view.jpg"),
    )
    recipe = render(LAYOUT, options, "test")
    values = settings(recipe.text)
    assert (values["max_iters"], values["accumulative_counts"], values["batch_size"]) == (400, 4, 16)
    assert "dict(type=CheckpointHook" in recipe.text
    assert "evaluation_images='/llava/view.jpg'" in recipe.text
    for words in (
        "seed 7",
        "100 optimizer steps",
        "per-device batch 16",
        "accumulation over 4",
        "checkpoints every 500",
    ):
        assert any(words in d for d in recipe.deviations), words


def test_a_run_shorter_than_the_logging_interval_logs_at_its_end():
    short = render(LAYOUT, RecipeOptions(max_steps=3), "test")
    assert "interval=3)" in short.text and any("logged every 3 iterations instead of 10" in d for d in short.deviations)
    assert "interval=10)" in render(LAYOUT, RecipeOptions(), "test").text


def test_rendering_is_deterministic():
    assert render(LAYOUT, RecipeOptions(), "v").sha256 == render(LAYOUT, RecipeOptions(), "v").sha256


@pytest.mark.parametrize("bad", [dict(precision="int8"), dict(device="tpu"), dict(max_steps=0)])
def test_bad_options_are_refused(bad):
    with pytest.raises(ValueError):
        RecipeOptions(**bad)


def test_user_config_is_used_as_written_with_stop_and_seed_as_cfg_options(tmp_path):
    config = tmp_path / "user.py"
    config.write_text("train_cfg = dict(max_epochs=1)\n")
    recipe = from_user_config(config, RecipeOptions(max_steps=50, seed=3), ConfigFacts(32, 1, "nf4", None))
    assert recipe.source == "user"
    assert recipe.text == "train_cfg = dict(max_epochs=1)\n"
    assert recipe.cfg_options == ["train_cfg.max_epochs=None", "train_cfg.max_iters=50", "randomness.seed=3"]


def test_a_user_configs_batch_and_accumulation_are_set_where_they_differ_and_read_back(tmp_path):
    """What the issue found: a user config of batch 4 asked for per-device 8 and global
    16 ran batch 4 without accumulation. Now the two are set through --cfg-options and
    the facts read back from the config XTuner runs say so."""
    config = tmp_path / "user.py"
    config.write_text(
        "batch_size = 4\ntrain_dataloader = dict(batch_size=batch_size)\noptim_wrapper = dict(type='x')\n"
    )
    as_written = read_facts(config.read_text())
    assert (as_written.per_device_batch, as_written.accumulative_counts) == (4, 1)
    options = RecipeOptions(max_steps=20, per_device_batch=8, accumulative_counts=2)
    recipe = from_user_config(config, options, as_written)
    assert (
        "train_dataloader.batch_size=8" in recipe.cfg_options
        and "optim_wrapper.accumulative_counts=2" in recipe.cfg_options
    )
    ran = read_facts(recipe.text, recipe.cfg_options)
    assert (ran.per_device_batch, ran.accumulative_counts, ran.max_iters) == (8, 2, 40)
    assert any("per-device batch 8 instead of the file's 4" in d for d in recipe.deviations)


# (options, the facts the rendered config must say back)
RENDERED = [
    (RecipeOptions(), ConfigFacts(32, 1, "nf4", 500, "AmpOptimWrapper")),
    (
        RecipeOptions(precision="bf16", per_device_batch=16, accumulative_counts=4, max_steps=10),
        ConfigFacts(16, 4, "bf16", 40, "AmpOptimWrapper"),
    ),
    (RecipeOptions(device="cpu", per_device_batch=8), ConfigFacts(8, 1, "fp32", 500, "OptimWrapper")),
    # the float32 reference keeps NF4's weights (their compute in float32); bf16's are held in float32
    (RecipeOptions(float32_reference=True), ConfigFacts(32, 1, "nf4", 500, "AmpOptimWrapper")),
    (RecipeOptions(precision="bf16", float32_reference=True), ConfigFacts(32, 1, "fp32", 500, "AmpOptimWrapper")),
]


@pytest.mark.parametrize("options, facts", RENDERED)
def test_the_rendered_config_says_back_what_the_options_asked(options, facts):
    ran = read_facts(render(LAYOUT, options, "test").text)
    assert replace(ran, lr=None, schedule=None, max_length=None, paths={}) == facts
    assert ran.lr == 1e-3 and ran.max_length == 1472 and ran.schedule_epochs == 1
    assert [s["type"] for s in ran.schedule] == ["LinearLR", "CosineAnnealingLR"]
    assert ran.unreadable() == []


def test_a_user_config_reads_back_as_the_trainer_reads_it(tmp_path):
    """What the issue found: a config that reassigns its batch (``//=``) and its LR after
    first setting them, and names another dataset, was reported with the first values.
    mmengine's reading, the trainer's, says what runs; a path that is not a string is
    unverified."""
    text = (DATA / "user_config.py").read_text()
    text = text.replace("batch_size = 8  # per device", "batch_size = 8\nbatch_size //= 4")
    text = text.replace("lr = 1e-3", "lr = 1e-3\nlr *= 20")
    text = text.replace("image_folder = './data/llava_data/LLaVA-Pretrain/images'", "image_folder = dict(path='x')")
    ran = read_facts(text, ["optim_wrapper.optimizer.weight_decay=0.1"])
    assert (ran.per_device_batch, ran.lr) == (2, pytest.approx(2e-2))
    assert ran.paths["image_folder"] is None
    assert "train_dataloader.dataset.image_folder" in ran.unreadable()
    with pytest.raises(ConfigUnreadable, match="SyntaxError"):
        read_facts("batch_size = = 2")
    with pytest.raises(ConfigUnreadable, match="NameError"):
        read_facts("batch_size = undefined_name + 1")


@pytest.mark.parametrize("gpus, accumulation", [(1, 32), (2, 16), (8, 4), (32, 1)])
def test_the_default_holds_the_reference_global_batch_on_any_cluster(gpus, accumulation):
    """Rendered without GPUs for 1, 2, 8 and 32 of them at batch 32: the config XTuner
    would run holds 1024 samples a step, the reference run's."""
    global_batch, counts, problem = global_batch_plan(None, 32, gpus, reference=True)
    assert (global_batch, counts, problem) == (1024, accumulation, None)
    ran = read_facts(render(LAYOUT, RecipeOptions(accumulative_counts=counts), "test").text)
    assert ran.per_device_batch * ran.accumulative_counts * gpus == REFERENCE_GLOBAL_BATCH


# (asked global batch, per-device batch, processes, reference?, plan, words in the problem)
PLANS = {
    "3 GPUs: no batch holds 1024, the nearest global batches are named": (
        None,
        32,
        3,
        True,
        (1024, 1),
        "no per-device batch holds it on 3 processes, or --global-batch 960 or 1056",
    ),
    "64 GPUs: 2048 samples a micro-step; per-device 16 holds 1024": (
        None,
        32,
        64,
        True,
        (1024, 1),
        "--per-device-batch 16 holds it",
    ),
    "another global batch, held": (64, 8, 2, True, (64, 4), None),
    "another global batch that does not divide": (100, 8, 2, True, (100, 1), "--global-batch 100 is not a multiple"),
    "CPU: one micro-batch a step": (None, 8, 1, False, (8, 1), None),
}


@pytest.mark.parametrize("name", list(PLANS))
def test_global_batch_plans(name):
    asked, batch, processes, reference, plan, words = PLANS[name]
    global_batch, counts, problem = global_batch_plan(asked, batch, processes, reference)
    assert (global_batch, counts) == plan
    assert (problem is None) == (words is None) and (words is None or words in problem)
