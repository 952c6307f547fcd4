"""Speed levers: one declaration each, which apply where, their defaults, the memory
model's sizing and the one retry, how they render into the config and the deviations."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from bench.core.layout import Layout
from bench.recipe.lever_defaults import resolve_levers, without_unavailable
from bench.recipe.lever_sizing import memory_retry, out_of_memory_hint, size_memory_levers
from bench.recipe.levers import LEVER_NEEDS, PERF_VARIANTS, STOCK, LeverRequest, Levers, chosen_on_gpus
from bench.recipe.memory_model import GPU_MEMORY_CAP_VARIABLE, MEMORY_MODEL_VARIABLE, gpu_memory
from bench.recipe.micro_batches import RecordLengths, plan
from bench.recipe.render import RecipeOptions, render
from bench.verdict import document as verdict_mod
from tests.conftest import REPO, spawn_run

H100 = [81559] * 8
H200 = [143771] * 8
A100_40 = [40960] * 8
GPU_DEFAULTS = Levers(
    dataloader_workers=4,
    pin_memory=True,
    tokenized_cache=True,
    skip_vit_backward=True,
    labelled_logits_only=True,
    sdpa_attention=True,
    fused_rms_norm=True,
    fused_rotary=True,
    fused_swiglu=True,
    grouped_query_sdpa=True,
    rotary_once=True,
)
# name: (request, device, precision, per-device batch, GPU memory, expected levers, problem words), for
# micro-batches of LLaVA-Pretrain's padded length (49 text tokens, 624 positions a sample); the LLM
# folder's code has SDPA attention (InternLM2's) unless the name says otherwise.
CASES = {
    "CPU: nothing on": (LeverRequest(), "cpu", "nf4", 32, [], STOCK, None),
    "80 GB GPUs, NF4: dequantized, 10 layers keep their MLP's outputs": (
        LeverRequest(),
        "cuda",
        "nf4",
        32,
        H100,
        replace(GPU_DEFAULTS, dequantize_nf4=True, selective_llm_layers=10),
        None,
    ),
    "141 GB GPUs, NF4: dequantized, every layer keeps its MLP's outputs, 2 of them all": (
        LeverRequest(),
        "cuda",
        "nf4",
        32,
        H200,
        replace(GPU_DEFAULTS, dequantize_nf4=True, unchecked_llm_layers=2, selective_llm_layers=46),
        None,
    ),
    "141 GB GPUs, bf16: as NF4 dequantized": (
        LeverRequest(),
        "cuda",
        "bf16",
        32,
        H200,
        replace(GPU_DEFAULTS, unchecked_llm_layers=2, selective_llm_layers=46),
        None,
    ),
    "code without SDPA, 141 GB, NF4: 48 selective layers, no eager one unchecked": (
        LeverRequest(),
        "cuda",
        "nf4",
        32,
        H200,
        replace(
            GPU_DEFAULTS, sdpa_attention=False, grouped_query_sdpa=False, dequantize_nf4=True, selective_llm_layers=48
        ),
        None,
    ),
    "code without SDPA, 80 GB, NF4: 8 selective layers fit": (
        LeverRequest(),
        "cuda",
        "nf4",
        32,
        H100,
        replace(
            GPU_DEFAULTS, sdpa_attention=False, grouped_query_sdpa=False, dequantize_nf4=True, selective_llm_layers=8
        ),
        None,
    ),
    "code without SDPA, SDPA asked for: refused": (
        LeverRequest(sdpa_attention=True),
        "cuda",
        "bf16",
        32,
        H200,
        replace(GPU_DEFAULTS, sdpa_attention=False, grouped_query_sdpa=False, selective_llm_layers=48),
        "no SDPA attention",
    ),
    "eager attention asked for: none unchecked": (
        LeverRequest(sdpa_attention=False),
        "cuda",
        "bf16",
        32,
        H200,
        replace(GPU_DEFAULTS, sdpa_attention=False, grouped_query_sdpa=False, selective_llm_layers=48),
        None,
    ),
    "grouped-query SDPA asked for without SDPA attention: a problem": (
        LeverRequest(sdpa_attention=False, grouped_query_sdpa=True),
        "cuda",
        "bf16",
        32,
        H200,
        replace(GPU_DEFAULTS, sdpa_attention=False, grouped_query_sdpa=False, selective_llm_layers=48),
        "--grouped-query-sdpa changes the work of --sdpa-attention",
    ),
    "all logits: room for 39 selective layers": (
        LeverRequest(labelled_logits_only=False),
        "cuda",
        "bf16",
        32,
        H200,
        replace(GPU_DEFAULTS, labelled_logits_only=False, selective_llm_layers=39),
        None,
    ),
    "half the batch: every layer selective, 39 of them unchecked": (
        LeverRequest(),
        "cuda",
        "bf16",
        16,
        H200,
        replace(GPU_DEFAULTS, unchecked_llm_layers=39, selective_llm_layers=9),
        None,
    ),
    "twice the batch: the activations grow with the positions, 19 selective layers fit": (
        LeverRequest(),
        "cuda",
        "bf16",
        64,
        H200,
        replace(GPU_DEFAULTS, selective_llm_layers=19),
        None,
    ),
    "the smallest GPU decides": (
        LeverRequest(),
        "cuda",
        "bf16",
        32,
        [*H200, 81559],
        replace(GPU_DEFAULTS, selective_llm_layers=10),
        None,
    ),
    "40 GB GPUs, NF4: weights stay 4-bit, 4 selective layers": (
        LeverRequest(),
        "cuda",
        "nf4",
        32,
        A100_40,
        replace(GPU_DEFAULTS, selective_llm_layers=4),
        None,
    ),
    "bf16 on 80 GB: nothing to dequantize": (
        LeverRequest(),
        "cuda",
        "bf16",
        32,
        H100,
        replace(GPU_DEFAULTS, selective_llm_layers=10),
        None,
    ),
    "no tokenized cache when asked": (
        LeverRequest(tokenized_cache=False),
        "cuda",
        "bf16",
        32,
        H100,
        replace(GPU_DEFAULTS, tokenized_cache=False, selective_llm_layers=10),
        None,
    ),
    "--stock: the pinned config": (LeverRequest(stock=True), "cuda", "nf4", 32, H100, STOCK, None),
    "--stock with a lever: refused": (
        LeverRequest(stock=True, dataloader_workers=2),
        "cuda",
        "nf4",
        32,
        H100,
        STOCK,
        "--stock",
    ),
    "--stock with unchecked layers: refused": (
        LeverRequest(stock=True, unchecked_llm_layers=0),
        "cuda",
        "nf4",
        32,
        H100,
        STOCK,
        "--stock",
    ),
    "one lever off, the others default: 4-bit weights leave room for 31 selective layers": (
        LeverRequest(dequantize_nf4=False),
        "cuda",
        "nf4",
        32,
        H100,
        replace(GPU_DEFAULTS, selective_llm_layers=31),
        None,
    ),
    "layers asked for: the user's call": (
        LeverRequest(unchecked_llm_layers=48),
        "cuda",
        "bf16",
        32,
        H100,
        replace(GPU_DEFAULTS, unchecked_llm_layers=48),
        None,
    ),
    "forced on a 40 GB GPU (the user's call)": (
        LeverRequest(dequantize_nf4=True),
        "cuda",
        "nf4",
        32,
        A100_40,
        replace(GPU_DEFAULTS, dequantize_nf4=True),
        None,
    ),
    "dequantize asked on CPU: refused": (
        LeverRequest(dequantize_nf4=True),
        "cpu",
        "nf4",
        32,
        [],
        STOCK,
        "--dequantize-nf4",
    ),
    "workers on CPU when asked": (
        LeverRequest(dataloader_workers=2, pin_memory=True),
        "cpu",
        "nf4",
        32,
        [],
        Levers(dataloader_workers=2, pin_memory=True),
        None,
    ),
    "tokenized cache on CPU when asked": (
        LeverRequest(tokenized_cache=True),
        "cpu",
        "nf4",
        32,
        [],
        Levers(tokenized_cache=True),
        None,
    ),
    "model levers on CPU when asked": (
        LeverRequest(skip_vit_backward=True, unchecked_llm_layers=1, labelled_logits_only=True, sdpa_attention=True),
        "cpu",
        "nf4",
        32,
        [],
        Levers(skip_vit_backward=True, unchecked_llm_layers=1, labelled_logits_only=True, sdpa_attention=True),
        None,
    ),
}


def uniform_plan(text_tokens: int, per_device_batch: int, labelled: int = 17, records: int = 4096):
    """The micro-batches of a dataset whose records all have ``text_tokens`` (49: the
    padded length of LLaVA-Pretrain's micro-batches of 32), on one GPU."""
    lengths = RecordLengths(
        [str(i) for i in range(records)],
        np.full(records, text_tokens),
        np.ones(records, dtype=np.int64),
        np.full(records, labelled),
    )
    return plan(lengths, per_device_batch, 1, 1, 20, 42, image_tokens=576)


def chosen_levers(request, device, precision, batch, memory, supports_sdpa, text_tokens=49):
    """What a run chooses: resolve_levers in preflight, then the memory levers sized for its micro-batches."""
    levers, problems = resolve_levers(request, device, precision, supports_sdpa=supports_sdpa)
    if device == "cuda" and not levers.stock:
        levers, _ = size_memory_levers(levers, request, precision, uniform_plan(text_tokens, batch), memory, 48, 48)
    return levers, problems


@pytest.mark.parametrize("name", list(CASES))
def test_resolve_levers(name):
    request, device, precision, batch, memory, expected, problem = CASES[name]
    levers, problems = chosen_levers(request, device, precision, batch, memory, "without SDPA" not in name)
    assert levers == expected
    if problem is None:
        assert problems == []
    else:
        assert len(problems) == 1 and problem in problems[0]


@pytest.mark.parametrize("memory, short, long", [(H200, (2, 46), (0, 43)), (H100, (0, 10), (0, 7))])
def test_longer_captions_leave_room_for_fewer_kept_layers(memory, short, long):
    """(unchecked, selective) layers for LLaVA-Pretrain's length and three times it."""
    for text_tokens, expected in ((49, short), (149, long)):
        levers = chosen_levers(LeverRequest(), "cuda", "nf4", 32, memory, True, text_tokens)[0]
        assert (levers.unchecked_llm_layers, levers.selective_llm_layers) == expected


def test_dequantized_weights_stay_only_where_they_fit_beside_the_heaviest_micro_batch():
    assert chosen_levers(LeverRequest(), "cuda", "nf4", 32, H100, True, 49)[0].dequantize_nf4 is True
    # near the truncation length the dequantized weights no longer fit beside a checkpointed micro-batch
    levers = chosen_levers(LeverRequest(), "cuda", "nf4", 32, H100, True, 1400)[0]
    assert levers.dequantize_nf4 is False and levers.unchecked_llm_layers == levers.selective_llm_layers == 0


# name: (request, chosen levers, what the failure lacked in MiB, the retry's levers: None for no retry)
RETRIES = {
    "the kept layers re-sized: at least half their memory given back": (
        LeverRequest(),
        replace(GPU_DEFAULTS, dequantize_nf4=True, unchecked_llm_layers=2, selective_llm_layers=46),
        300.0,
        replace(GPU_DEFAULTS, dequantize_nf4=True, selective_llm_layers=25),
    ),
    "a large shortfall gives back the layers that free it": (
        LeverRequest(),
        replace(GPU_DEFAULTS, dequantize_nf4=True, unchecked_llm_layers=2, selective_llm_layers=46),
        45_000.0,
        replace(GPU_DEFAULTS, dequantize_nf4=True, selective_llm_layers=15),
    ),
    "no layer left to give back: the dequantized weights go": (
        LeverRequest(),
        replace(GPU_DEFAULTS, dequantize_nf4=True),
        300.0,
        GPU_DEFAULTS,
    ),
    "the user's layers stay: the dequantized default goes": (
        LeverRequest(unchecked_llm_layers=4),
        replace(GPU_DEFAULTS, dequantize_nf4=True, unchecked_llm_layers=4),
        300.0,
        replace(GPU_DEFAULTS, unchecked_llm_layers=4),
    ),
    "every memory lever the user's: no retry": (
        LeverRequest(unchecked_llm_layers=4, dequantize_nf4=True),
        replace(GPU_DEFAULTS, dequantize_nf4=True, unchecked_llm_layers=4),
        300.0,
        None,
    ),
    "nothing spent: no retry": (LeverRequest(), GPU_DEFAULTS, 300.0, None),
    "stock: no retry": (LeverRequest(stock=True), STOCK, 300.0, None),
}


@pytest.mark.parametrize("name", list(RETRIES))
def test_an_out_of_memory_retry_re_sizes_only_the_defaults(name):
    request, chosen, shortfall, retry = RETRIES[name]
    assert memory_retry(chosen, request, "nf4", uniform_plan(49, 32), 48, shortfall) == retry


def test_the_out_of_memory_hint_names_what_frees_memory_in_this_recipe():
    levers = replace(GPU_DEFAULTS, dequantize_nf4=True, unchecked_llm_layers=17)
    nf4 = out_of_memory_hint("nf4", levers, uniform_plan(49, 32))
    assert "--unchecked-llm-layers 8 or 0" in nf4 and "--no-dequantize-nf4" in nf4 and "--precision nf4" not in nf4
    assert "about 3,521 MiB a layer" in nf4  # one layer at 32 x 624 positions
    bf16 = out_of_memory_hint("bf16", STOCK)
    assert "--precision nf4" in bf16 and "--labelled-logits-only" in bf16 and "--unchecked-llm-layers" not in bf16


# name: (environment, cards' memory, memory for the defaults, cap, problem words)
SIMULATIONS = {
    "nothing set: the cards": ({}, (143771,), (143771,), None, None),
    "an 80 GB card simulated": ({GPU_MEMORY_CAP_VARIABLE: "81559"}, (81559,), (81559,), 81559, None),
    "a cap above the card changes nothing": ({GPU_MEMORY_CAP_VARIABLE: "200000"}, (143771,), (143771,), 200000, None),
    "the defaults' mistake forced": (
        {GPU_MEMORY_CAP_VARIABLE: "81559", MEMORY_MODEL_VARIABLE: "143771"},
        (81559,),
        (143771,),
        81559,
        None,
    ),
    "not a number": ({GPU_MEMORY_CAP_VARIABLE: "80GB"}, (143771,), (143771,), None, "'80GB' is not a positive number"),
    "zero": ({MEMORY_MODEL_VARIABLE: "0"}, (143771,), (143771,), None, "is not a positive number"),
}


@pytest.mark.parametrize("name", list(SIMULATIONS))
def test_a_smaller_gpu_is_simulated_from_the_environment(name):
    env, cards, for_defaults, cap, problem = SIMULATIONS[name]
    memory, problems = gpu_memory([143771], env)
    assert (memory.cards, memory.for_defaults, memory.cap_mib) == (cards, for_defaults, cap)
    assert (problem is None) == (not problems) and (problem is None or problem in problems[0])


def test_levers_render_into_the_config_and_are_listed_as_deviations():
    layout = Layout.at(Path("/llava"))
    options = RecipeOptions(
        levers=Levers(
            dataloader_workers=4,
            pin_memory=True,
            dequantize_nf4=True,
            skip_vit_backward=True,
            unchecked_llm_layers=12,
            labelled_logits_only=True,
            sdpa_attention=True,
        )
    )
    recipe = render(layout, options, "test")
    assert "from bench.trainer.levered_llava import LeveredLLaVAModel" in recipe.text
    assert (
        "type=LeveredLLaVAModel,\n    skip_vit_backward=True,\n    unchecked_llm_layers=12,\n    "
        "labelled_logits_only=True," in recipe.text
    )
    assert any("the last 12 LLM decoder layers" in change for change in recipe.deviations)
    assert "torch_dtype=torch.float16,\n        attn_implementation='sdpa',\n        quantization_config" in recipe.text
    assert any("SDPA class" in change for change in recipe.deviations)
    assert "type=LLaVAModel," in render(layout, RecipeOptions(levers=STOCK), "test").text
    assert "dataloader_num_workers = 4" in recipe.text
    assert "pin_memory=True," in recipe.text
    assert "from bench.trainer.dequantize import from_pretrained_dequantized" in recipe.text
    assert "type=from_pretrained_dequantized," in recipe.text
    assert any("dequantized once" in change for change in recipe.deviations)
    assert render(layout, RecipeOptions(levers=STOCK), "test").sha256 != recipe.sha256


def test_dequantizing_is_refused_where_it_cannot_apply():
    with pytest.raises(ValueError, match="NF4 on GPUs"):
        RecipeOptions(device="cpu", levers=Levers(dequantize_nf4=True))


def test_stock_with_a_lever_option_is_refused_before_training(synthetic_layout, tmp_path):
    done = spawn_run(
        synthetic_layout,
        tmp_path,
        "--device",
        "cpu",
        "--stock",
        "--dataloader-workers",
        "2",
    )
    assert done.returncode == 2
    assert "--stock (and --float32-reference) turn every lever off" in done.stderr


def test_a_lever_is_one_declaration_from_which_run_and_perf_take_their_options():
    """Each of Levers' fields declares one lever (bench.recipe.levers.lever); `run` gets one option per lever
    (a switch for a flag, a count for a number), LeverRequest one field, and perf's
    single-lever variants set every other lever to its stock value."""
    from dataclasses import fields

    import typer.main

    from bench.recipe.levers import LEVER_HELP, STOCK, LeverRequest, Levers, lever_option
    from entrypoint.cli.app import app
    from entrypoint.tools.perf import VARIANTS

    names = [lever.name for lever in fields(Levers)]
    assert list(LEVER_HELP) == names
    assert [field.name for field in fields(LeverRequest)] == ["stock", *names]
    run = typer.main.get_command(app).commands["run"]
    options = {option: parameter for parameter in run.params for option in parameter.opts}
    for name in names:
        parameter = options[lever_option(name)]
        assert parameter.help == LEVER_HELP[name] and parameter.default is None
        assert bool(parameter.secondary_opts) == isinstance(getattr(STOCK, name), bool), name  # --no-... for a switch
    assert VARIANTS["vit"].count("--skip-vit-backward") == 1 and "--unchecked-llm-layers" in VARIANTS["vit"]
    assert "--unchecked-llm-layers" not in VARIANTS["unchecked"]  # run's own default for the GPUs' memory


def test_the_verdict_schema_lists_every_lever_with_its_type():
    """recipe.levers in schemas/verdict.schema.json is the third place a lever is named
    (after its declaration and its trainer-side logic): it must name each one, typed."""
    from dataclasses import fields

    from bench.recipe.levers import Levers

    levers = verdict_mod.schema()["properties"]["recipe"]["properties"]["levers"]
    json_types = {"int": "integer", "bool": "boolean"}
    declared = {lever.name: json_types[lever.type] for lever in fields(Levers)}
    assert levers["required"] == [*declared, "stock"]
    assert {name: levers["properties"][name]["type"] for name in declared} == declared


OLD_TORCH = {  # what the image's torch 2.1.2 and Triton 2.1.0 lack of the levers' needs
    "torch.utils.checkpoint.create_selective_checkpoint_contexts": "torch 2.1.2 lacks it",
    "torch.nn.functional.rms_norm": "torch 2.1.2 lacks it",
    "triton.backends": "triton 2.1.0 lacks it",
    "triton.language.extra.libdevice": "triton 2.1.0 lacks it",
    "torch.nn.attention.flex_attention": "torch 2.1.2 lacks it",
}


def test_a_lever_whose_api_the_install_lacks_stays_at_stock_and_the_memory_model_sizes_without_it():
    request, problems = without_unavailable(LeverRequest(), OLD_TORCH)
    assert problems == []
    levers, _ = chosen_levers(request, "cuda", "nf4", 32, H200, True)
    assert levers.fused_rms_norm is False and levers.fused_rotary is False and levers.selective_llm_layers == 0
    assert levers.fused_swiglu is False and levers.grouped_query_sdpa is False
    assert levers.unchecked_llm_layers > 0 and levers.skip_vit_backward  # the rest as on any GPU
    # asked for by name, it is a preflight problem that says what is missing
    _, problems = without_unavailable(LeverRequest(fused_rms_norm=True), OLD_TORCH)
    assert problems == ["--fused-rms-norm needs torch.nn.functional.rms_norm: torch 2.1.2 lacks it"]
    assert without_unavailable(LeverRequest(stock=True), OLD_TORCH) == (LeverRequest(stock=True), [])
    # the console names a held lever where the GPU defaults would have chosen it
    assert chosen_on_gpus("fused_rms_norm") and chosen_on_gpus("selective_llm_layers")
    assert chosen_on_gpus("fused_rotary") and chosen_on_gpus("dataloader_workers")


def test_each_lever_need_is_a_real_path_and_a_missing_one_says_why():
    from entrypoint.preflight.environment import missing_apis

    assert missing_apis(LEVER_NEEDS.values()) == {}  # a misspelt need would hold its lever off everywhere
    assert set(LEVER_NEEDS) >= {
        "selective_llm_layers",
        "fused_rms_norm",
        "fused_rotary",
        "fused_swiglu",
        "grouped_query_sdpa",
    }
    missing = missing_apis(["torch.nn.functional.no_such_function", "no_such_module.name", "json.dumps"])
    assert missing == {
        "torch.nn.functional.no_such_function": f"torch {importlib.metadata.version('torch')} lacks it",
        "no_such_module.name": "no_such_module is not installed",
    }


def test_the_trainer_side_imports_without_the_apis_an_older_torch_lacks():
    """The levers' model imports where torch lacks the selective-checkpoint API and
    rms_norm (the image's torch 2.1.2): only a lever that is on may call them."""
    code = (
        "import torch, torch.utils.checkpoint as c\n"
        "del c.create_selective_checkpoint_contexts, c.CheckpointPolicy, torch.nn.functional.rms_norm\n"
        "import bench.trainer.levered_llava\n"
        "print('imported')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.stdout.strip() == "imported", done.stderr[-2000:]


def test_a_lever_that_changes_another_levers_work_is_measured_with_it():
    """`perf`'s variant of grouped-query SDPA turns SDPA attention on too (stock runs eager
    attention, where the lever would be off), so it is held against stock-sdpa's."""
    from entrypoint.tools.perf import VARIANTS

    assert PERF_VARIANTS["grouped-query-sdpa"] == {"grouped_query_sdpa": True, "sdpa_attention": True}
    assert PERF_VARIANTS["stock-sdpa"] == {"sdpa_attention": True}
    assert (
        "--grouped-query-sdpa" in VARIANTS["grouped-query-sdpa"]
        and "--sdpa-attention" in VARIANTS["grouped-query-sdpa"]
    )
