"""Speed levers: which apply where, how they render, and that they keep the math.

The dequantized-NF4 lever needs CUDA and bitsandbytes' GPU kernels; its loss-curve
agreement with stock NF4 is checked on the GPU machine (tests/test_gpu.py).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from bench.core.layout import Layout
from bench.core.tokenized_folder import COMPLETENESS_RECORD
from bench.recipe.levers import (
    STOCK,
    LeverRequest,
    Levers,
    memory_retry,
    out_of_memory_hint,
    resolve_levers,
    size_memory_levers,
)
from bench.recipe.memory_model import GPU_MEMORY_CAP_VARIABLE, MEMORY_MODEL_VARIABLE, gpu_memory
from bench.recipe.micro_batches import RecordLengths, plan
from bench.recipe.render import RecipeOptions, render
from bench.recipe.tokenization import cache_name
from bench.synth.spec import DEMO_PER_DEVICE_BATCH
from bench.verdict import document as verdict_mod
from tests.conftest import CPU, llava_bench, torchrun_gloo

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
)
# name: (request, device, precision, per-device batch, GPU memory, expected levers, problem words), for
# micro-batches of LLaVA-Pretrain's padded length (49 text tokens, 624 positions a sample); the LLM
# folder's code has SDPA attention (InternLM2's) unless the name says otherwise.
CASES = {
    "CPU: nothing on": (LeverRequest(), "cpu", "nf4", 32, [], STOCK, None),
    "80 GB GPUs, NF4: dequantized, 3 layers unchecked": (
        LeverRequest(),
        "cuda",
        "nf4",
        32,
        H100,
        replace(GPU_DEFAULTS, dequantize_nf4=True, unchecked_llm_layers=3),
        None,
    ),
    "141 GB GPUs, NF4: dequantized, 18 layers unchecked": (
        LeverRequest(),
        "cuda",
        "nf4",
        32,
        H200,
        replace(GPU_DEFAULTS, dequantize_nf4=True, unchecked_llm_layers=18),
        None,
    ),
    "141 GB GPUs, bf16: 18 layers unchecked": (
        LeverRequest(),
        "cuda",
        "bf16",
        32,
        H200,
        replace(GPU_DEFAULTS, unchecked_llm_layers=18),
        None,
    ),
    "code without SDPA, 141 GB, NF4: eager layers cost more, 10 fit": (
        LeverRequest(),
        "cuda",
        "nf4",
        32,
        H200,
        replace(GPU_DEFAULTS, sdpa_attention=False, dequantize_nf4=True, unchecked_llm_layers=10),
        None,
    ),
    "code without SDPA, 80 GB, NF4: 1 eager layer fits": (
        LeverRequest(),
        "cuda",
        "nf4",
        32,
        H100,
        replace(GPU_DEFAULTS, sdpa_attention=False, dequantize_nf4=True, unchecked_llm_layers=1),
        None,
    ),
    "code without SDPA, SDPA asked for: refused": (
        LeverRequest(sdpa_attention=True),
        "cuda",
        "bf16",
        32,
        H200,
        replace(GPU_DEFAULTS, sdpa_attention=False, unchecked_llm_layers=10),
        "no SDPA attention",
    ),
    "eager attention asked for: fewer layers": (
        LeverRequest(sdpa_attention=False),
        "cuda",
        "bf16",
        32,
        H200,
        replace(GPU_DEFAULTS, sdpa_attention=False, unchecked_llm_layers=10),
        None,
    ),
    "all logits: room for 13 layers": (
        LeverRequest(labelled_logits_only=False),
        "cuda",
        "bf16",
        32,
        H200,
        replace(GPU_DEFAULTS, labelled_logits_only=False, unchecked_llm_layers=13),
        None,
    ),
    "half the batch: more than twice the layers": (
        LeverRequest(),
        "cuda",
        "bf16",
        16,
        H200,
        replace(GPU_DEFAULTS, unchecked_llm_layers=42),
        None,
    ),
    "twice the batch: the activations grow with the positions, 6 layers fit": (
        LeverRequest(),
        "cuda",
        "bf16",
        64,
        H200,
        replace(GPU_DEFAULTS, unchecked_llm_layers=6),
        None,
    ),
    "the smallest GPU decides": (
        LeverRequest(),
        "cuda",
        "bf16",
        32,
        [*H200, 81559],
        replace(GPU_DEFAULTS, unchecked_llm_layers=3),
        None,
    ),
    "40 GB GPUs, NF4: weights stay 4-bit, 1 layer unchecked": (
        LeverRequest(),
        "cuda",
        "nf4",
        32,
        A100_40,
        replace(GPU_DEFAULTS, unchecked_llm_layers=1),
        None,
    ),
    "bf16 on 80 GB: nothing to dequantize": (
        LeverRequest(),
        "cuda",
        "bf16",
        32,
        H100,
        replace(GPU_DEFAULTS, unchecked_llm_layers=3),
        None,
    ),
    "no tokenized cache when asked": (
        LeverRequest(tokenized_cache=False),
        "cuda",
        "bf16",
        32,
        H100,
        replace(GPU_DEFAULTS, tokenized_cache=False, unchecked_llm_layers=3),
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
    "one lever off, the others default: 4-bit weights leave room for 11 unchecked layers": (
        LeverRequest(dequantize_nf4=False),
        "cuda",
        "nf4",
        32,
        H100,
        replace(GPU_DEFAULTS, unchecked_llm_layers=11),
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


@pytest.mark.parametrize("memory, short, long", [(H200, 18, 15), (H100, 3, 2)])
def test_longer_captions_leave_room_for_fewer_unchecked_layers(memory, short, long):
    assert chosen_levers(LeverRequest(), "cuda", "nf4", 32, memory, True, 49)[0].unchecked_llm_layers == short
    assert chosen_levers(LeverRequest(), "cuda", "nf4", 32, memory, True, 149)[0].unchecked_llm_layers == long


def test_dequantized_weights_stay_only_where_they_fit_beside_the_heaviest_micro_batch():
    assert chosen_levers(LeverRequest(), "cuda", "nf4", 32, H100, True, 49)[0].dequantize_nf4 is True
    # near the truncation length the dequantized weights no longer fit beside a checkpointed micro-batch
    levers = chosen_levers(LeverRequest(), "cuda", "nf4", 32, H100, True, 1400)[0]
    assert levers.dequantize_nf4 is False and levers.unchecked_llm_layers == 0


# name: (request, chosen levers, what the failure lacked in MiB, the retry's levers: None for no retry)
RETRIES = {
    "the unchecked layers re-sized: at least half given back": (
        LeverRequest(),
        replace(GPU_DEFAULTS, dequantize_nf4=True, unchecked_llm_layers=17),
        300.0,
        replace(GPU_DEFAULTS, dequantize_nf4=True, unchecked_llm_layers=8),
    ),
    "a large shortfall gives back the layers that free it": (
        LeverRequest(),
        replace(GPU_DEFAULTS, dequantize_nf4=True, unchecked_llm_layers=17),
        45_000.0,
        replace(GPU_DEFAULTS, dequantize_nf4=True, unchecked_llm_layers=4),
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


def perf_on_cpu(root: Path, out: Path, *args: str):
    """`llava-bench perf` of 30 steps on this machine's CPU at the demo's batch."""
    return llava_bench("perf", "--root", str(root), "--out", str(out), "--steps", "30", *CPU, *args)


def test_perf_runs_stock_and_a_lever_back_to_back_and_the_training_agrees(synthetic_layout, tmp_path):
    """`llava-bench perf` on CPU: real runs of the stock recipe, stock again (its noise)
    and 2 dataloader workers with pinned memory; the same samples in the same order give
    the same losses and the same projector after the last step."""
    done = perf_on_cpu(
        synthetic_layout,
        tmp_path,
        "--variant",
        "stock",
        "--variant",
        "stock-again",
        "--variant",
        "workers",
        "--json",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    stock, again, workers = json.loads(done.stdout)
    assert (stock["variant"], again["variant"], workers["variant"]) == ("stock", "stock-again", "workers")
    assert stock["levers"]["stock"] is True and stock["ratio_vs_stock"] == 1.0
    assert workers["levers"] == {
        "dataloader_workers": 4,
        "pin_memory": True,
        "dequantize_nf4": False,
        "tokenized_cache": False,
        "skip_vit_backward": False,
        "unchecked_llm_layers": 0,
        "labelled_logits_only": False,
        "sdpa_attention": False,
        "stock": False,
    }
    assert workers["termination"] == "completed" and workers["seconds_per_step"] > 0
    assert workers["preflight_seconds"] > 0 and workers["startup_seconds"] > 0
    assert workers["max_loss_difference"] == 0.0  # three logged losses, identical
    # One CPU process is deterministic: stock's own noise is nil, and so are the lever's differences.
    assert again["projector_distance"] == 0.0 and workers["projector_distance"] == 0.0
    assert again["gradient_difference"] == 0.0 and workers["gradient_difference"] == 0.0
    assert workers["gradient_agrees"] is True and stock["llm_architecture"] == "InternLM2ForCausalLM"
    report = json.loads((tmp_path / "perf.json").read_text())
    assert [row["variant"] for row in report["rows"]] == ["stock", "stock-again", "workers"]
    assert report["projector_movement"] > 1e-3  # the learning rate moved the projector
    assert report["matmul_tflops_per_device"] > 0  # the CPU's fp32 rate here
    assert 0 < stock["limit_seconds_per_step"] < stock["seconds_per_step"]
    assert stock["times_limit"] == stock["seconds_per_step"] / stock["limit_seconds_per_step"]
    for row in report["rows"]:
        verdict_mod.validate(json.loads((Path(row["run_dir"]) / "verdict.json").read_text()))
    again = perf_on_cpu(
        synthetic_layout,
        tmp_path,
        "--variant",
        "stock",
        "--json",
    )
    assert again.returncode == 0 and "stock: reusing" in again.stderr  # a finished variant is not run again
    assert json.loads(again.stdout)[0]["run_dir"] == stock["run_dir"]


def test_the_projector_check_fails_a_run_whose_projector_did_not_train(synthetic_layout, layout_copy, tmp_path):
    """The check can fail for the reason it exists: stock's config run with the
    projector's gradients zeroed (a broken lever, tests/zero_projector_gradient.py)
    has a first gradient 100 % away from stock's and ends with the projector where it
    started, far outside stock's noise."""
    from bench.verdict.perf_compare import compare, compare_projectors

    verdicts = {}
    for name in ("stock", "stock-again"):
        done = llava_bench(
            "run",
            "--root",
            str(synthetic_layout),
            "--out",
            str(tmp_path / name),
            "--device",
            "cpu",
            "--stock",
            "--save-projector",
            "--per-device-batch",
            str(DEMO_PER_DEVICE_BATCH),
            "--max-steps",
            "20",
            "--target-loss",
            "1e9",
            "--json",
        )
        assert done.returncode == 0, done.stderr[-3000:]
        verdicts[name] = json.loads(done.stdout)
        verdicts[name]["_run_dir"] = str(tmp_path / name / verdicts[name]["run_id"])
    config = (Path(verdicts["stock"]["_run_dir"]) / "config.py").read_text()
    assert "type=LLaVAModel," in config and "ProjectorSnapshotHook" in config
    broken = config.replace("type=LLaVAModel,", "type=ZeroProjectorGradientLLaVAModel,").replace(
        "from xtuner.model import LLaVAModel\n",
        "from xtuner.model import LLaVAModel\nfrom tests.zero_projector_gradient import "
        "ZeroProjectorGradientLLaVAModel\n",
    )
    # the rendered config names the pristine layout's files; an override must name its own layout's
    Layout.at(layout_copy).config_override.write_text(broken.replace(str(synthetic_layout), str(layout_copy)))
    repo = str(Path(__file__).resolve().parent.parent)
    done = llava_bench(
        "run",
        "--root",
        str(layout_copy),
        "--out",
        str(tmp_path / "broken"),
        *CPU,
        "--max-steps",
        "20",
        "--target-loss",
        "1e9",
        "--json",
        env={**os.environ, "PYTHONPATH": repo},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    verdicts["broken"] = json.loads(done.stdout)
    verdicts["broken"]["_run_dir"] = str(tmp_path / "broken" / verdicts["broken"]["run_id"])
    projectors = compare_projectors(verdicts)
    rows = {row.variant: row for row in compare(verdicts, None, projectors)}
    assert projectors.movement > 1e-3
    assert rows["stock-again"].gradient_agrees is True and rows["stock-again"].gradient_difference == 0.0
    assert rows["broken"].gradient_difference == pytest.approx(1.0)  # what it saw was zero
    assert rows["broken"].gradient_agrees is False
    assert rows["broken"].projector_distance == pytest.approx(1.0)  # still at its start


def _saved_projector(folder: Path, initial, gradient, compared) -> dict:
    """A run folder holding the three projector snapshots; its verdict as perf reads it."""
    from safetensors.torch import save_file

    from bench.core.trainer_files import PROJECTOR_SNAPSHOTS

    (folder / "xtuner").mkdir(parents=True)
    for key, tensor in (("before_train", initial), ("first_gradient", gradient), ("after_compared_steps", compared)):
        save_file({"weight": tensor}, str(folder / "xtuner" / PROJECTOR_SNAPSHOTS[key]))
    return {"_run_dir": str(folder)}


# variant -> (its first gradient's difference from the exact one, its move's), and whether each agrees:
# stock differs by 10 % (its half-precision rounding), so anything within 20 % of exact agrees.
AGAINST_EXACT = {
    "stock": ((0.10, 0.10), (True, True)),
    "rounds-otherwise": ((0.18, 0.15), (True, True)),
    "scaled-gradient": ((0.50, 0.10), (False, True)),
    "zeroed-gradient": ((1.00, 1.00), (False, False)),
}


def test_with_an_exact_run_each_variant_is_held_against_it_with_stocks_rounding_as_the_allowance(tmp_path):
    """The check on the GPUs' half precision, where stock itself is off the float32
    math: a variant within twice stock's difference agrees; a lever that scaled or
    zeroed the gradient does not, however large stock's own rounding."""
    import torch

    from bench.verdict.perf_compare import compare, compare_projectors

    initial, gradient, move = torch.ones(64), torch.linspace(-1, 1, 64), torch.full((64,), 0.01)
    noise = torch.sin(torch.arange(64.0))  # a direction off both, scaled to each difference
    verdicts = {"exact": _saved_projector(tmp_path / "exact", initial, gradient, initial + move)}
    for variant, ((gradient_off, move_off), _) in AGAINST_EXACT.items():
        verdicts[variant] = _saved_projector(
            tmp_path / variant,
            initial,
            gradient + noise / noise.norm() * gradient.norm() * gradient_off,
            initial + move + noise / noise.norm() * move.norm() * move_off,
        )
    projectors = compare_projectors(verdicts)
    assert (projectors.reference, projectors.allowance_from) == ("exact", "stock")
    assert projectors.movement == pytest.approx(0.01)
    rows = {
        row.variant: row
        for row in compare(
            {k: {**v, "termination": {"kind": "completed"}, "world_size": 1} for k, v in verdicts.items()},
            None,
            projectors,
        )
    }
    assert rows["exact"].gradient_difference == 0.0 and rows["exact"].gradient_agrees is True
    for variant, ((gradient_off, move_off), expected) in AGAINST_EXACT.items():
        row = rows[variant]
        assert (row.gradient_difference, row.projector_distance) == (
            pytest.approx(gradient_off, rel=1e-4),
            pytest.approx(move_off, rel=1e-4),
        )
        assert (row.gradient_agrees, row.projector_agrees) == expected, variant


def test_a_check_whose_allowance_reaches_a_broken_levers_distance_says_it_cannot_tell():
    """Measured on the 20B shapes (docs/PERFORMANCE.md): stock's weights after the
    compared steps were 0.66 of their move from the float32 run's; twice that exceeds
    the 1.0 of a projector that never trained, so that check cannot fail and says so."""
    from bench.verdict.perf_compare import agrees

    assert agrees(0.66, 0.66) is None and agrees(5.0, 0.5) is None
    assert agrees(0.33, 0.34) is True and agrees(1.0, 0.34) is False
    assert agrees(0.019, 0.0) is True and agrees(0.03, None) is False  # the rounding floor where stock's own is nil


def test_against_exact_without_stock_nothing_is_judged(tmp_path):
    """Without stock, no half-precision allowance was measured: a GPU variant 33 % off
    a float32 run is neither passed nor failed."""
    import torch

    from bench.verdict.perf_compare import compare_projectors

    initial, gradient = torch.ones(8), torch.arange(8.0)
    verdicts = {
        "exact": _saved_projector(tmp_path / "exact", initial, gradient, initial + 0.01),
        "default": _saved_projector(tmp_path / "default", initial, gradient * 1.33, initial + 0.02),
    }
    projectors = compare_projectors(verdicts)
    assert (projectors.reference, projectors.allowance_from) == ("exact", None)
    assert projectors.gradient_differences["default"] == pytest.approx(0.33, rel=1e-4)
    assert projectors.agrees("default") == (None, None)


def test_perf_refuses_an_unknown_variant(tmp_path):
    done = llava_bench("perf", "--root", str(tmp_path), "--variant", "turbo")
    assert done.returncode == 2
    assert "turbo" in done.stderr


def _cpu_run(layout: Path, out: Path, *options: str) -> subprocess.CompletedProcess:
    """A real 20-step CPU run of the demo's batch, its verdict on stdout."""
    return llava_bench(
        "run",
        "--root",
        str(layout),
        "--out",
        str(out),
        *CPU,
        "--max-steps",
        "20",
        "--target-loss",
        "1.6",
        "--json",
        *options,
    )


def _losses(verdict: dict) -> list[float]:
    return [point["loss"] for point in verdict["result"]["curve"]]


def test_the_tokenized_cache_is_built_then_reused_with_xtuners_losses(synthetic_layout, tmp_path):
    """Real CPU runs: XTuner's own tokenization (no cache), then the cache lever twice:
    the first run's appliance tokenizes before training, the second finds the cache;
    the same tokens give the same losses in all three."""
    verdicts = []
    for lever in ("--no-tokenized-cache", "--tokenized-cache", "--tokenized-cache"):
        done = _cpu_run(synthetic_layout, tmp_path, lever)
        assert done.returncode == 0, done.stderr[-3000:]
        verdicts.append(json.loads(done.stdout))
    (cache,) = (tmp_path / "cache").iterdir()
    assert (cache / "dataset_info.json").is_file() and cache.name.startswith("tokenized-")
    assert verdicts[0]["timing"]["startup"].get("tokenization") is None
    built, found = (v["timing"]["startup"]["tokenization"] for v in verdicts[1:])
    assert built["source"] == "built" and built["folder"] == str(cache) and built["build"]["kept"] > 0
    assert found["source"] == "cache" and found["build"] is None and found["wait_seconds"] == 0
    assert [v["recipe"]["levers"]["tokenized_cache"] for v in verdicts] == [False, True, True]
    assert any(str(cache) in d for d in verdicts[1]["recipe"]["deviations"])
    trainer = verdicts[2]["timing"]["startup"]["trainer"]
    assert 0 < trainer["runner_seconds"] and 0 <= trainer["dataset_seconds"]
    (rank,) = verdicts[2]["ranks"]["per_rank"]  # one CPU process, timed by its hook
    assert rank["rank"] == 0 and rank["iterations"] > 0 and verdicts[2]["ranks"]["stragglers"] == []
    # a cache damaged on disk (an arrow file emptied, as a power loss leaves it) is built again, and said so
    (arrow,) = cache.glob("*.arrow")
    arrow.write_bytes(b"")
    done = _cpu_run(synthetic_layout, tmp_path, "--tokenized-cache")
    assert done.returncode == 0, done.stderr[-3000:]
    rebuilt = json.loads(done.stdout)
    tokenization = rebuilt["timing"]["startup"]["tokenization"]
    assert tokenization["source"] == "built" and f"{arrow.name} is 0" in tokenization["detail"]
    assert "was built again" in tokenization["detail"] and arrow.stat().st_size > 0
    assert _losses(rebuilt) == _losses(verdicts[2])
    curves = [[p["loss"] for p in v["result"]["curve"]] for v in verdicts]
    assert curves[1] == curves[0] and curves[2] == curves[0]


def test_a_failed_build_leaves_the_tokenization_to_xtuner_and_the_run_passes(synthetic_layout, tmp_path):
    """The cache's folder cannot be made (a file stands where it goes): the appliance's
    build fails, the trainer tokenizes with XTuner's code, cannot keep the result either,
    and trains; the verdict says why."""
    (tmp_path / "cache").write_text("not a folder")
    done = _cpu_run(synthetic_layout, tmp_path, "--tokenized-cache")
    assert done.returncode == 0, done.stderr[-3000:]
    tokenization = json.loads(done.stdout)["timing"]["startup"]["tokenization"]
    assert tokenization["source"] == "failed" and "Error" in tokenization["detail"]
    assert "XTuner's own code" in done.stderr + done.stdout


def test_the_cache_folder_changes_with_the_dataset_or_the_tokenizer(layout_copy):
    llm_dir = Layout.at(layout_copy).llm_dir
    name = cache_name("a" * 64, llm_dir)
    assert name == cache_name("a" * 64, llm_dir) != cache_name("b" * 64, llm_dir)
    (llm_dir / "tokenizer_config.json").write_text((llm_dir / "tokenizer_config.json").read_text() + " ")
    assert name != cache_name("a" * 64, llm_dir)


def test_stock_with_a_lever_option_is_refused_before_training(synthetic_layout, tmp_path):
    done = llava_bench(
        "run",
        "--root",
        str(synthetic_layout),
        "--out",
        str(tmp_path),
        "--device",
        "cpu",
        "--stock",
        "--dataloader-workers",
        "2",
    )
    assert done.returncode == 2
    assert "--stock (and --float32-reference) turn every lever off" in done.stderr


def _one_training_step(layout: Path, model_class, attention: str = "eager", **levers) -> tuple[Counter, float, list]:
    """Build the model from the tiny layout as XTuner's config does (InternLM2's own code,
    ``attention`` as the attention lever asks), run one forward and backward, and return
    the MLP calls of each LLM layer and of the ViT's first layer (a recomputed layer
    calls its MLP again), the rows the output projection computed (key "logits"), the
    loss and the projector's gradients."""
    import torch
    from transformers import AutoModelForCausalLM, CLIPVisionModel
    from xtuner.utils import IMAGE_TOKEN_INDEX

    paths = Layout.at(layout)
    torch.manual_seed(0)  # the projector's initial weights
    model = model_class(
        llm=AutoModelForCausalLM.from_pretrained(paths.llm_dir, trust_remote_code=True, attn_implementation=attention),
        visual_encoder=CLIPVisionModel.from_pretrained(paths.clip_dir),
        freeze_llm=True,
        freeze_visual_encoder=True,
        **levers,
    ).train()
    assert type(model.llm).__name__ == "InternLM2ForCausalLM"
    assert (
        type(model.llm.model.layers[0].attention).__name__
        == {"eager": "InternLM2Attention", "sdpa": "InternLM2SdpaAttention"}[attention]
    )
    calls = Counter()
    mlps = {f"llm.{i}": layer.feed_forward for i, layer in enumerate(model.llm.model.layers)}
    mlps["vit.0"] = model.visual_encoder.vision_model.encoder.layers[0].mlp
    for name, mlp in mlps.items():
        # at the call, not its end: a non-reentrant recompute stops once it has what backward needs
        mlp.register_forward_pre_hook(lambda *_, name=name: calls.update([name]))
    model.llm.output.register_forward_pre_hook(lambda _, args: calls.update({"logits": args[0].shape[:-1].numel()}))
    size = model.visual_encoder.config.image_size
    data = {
        "input_ids": torch.tensor([[1, IMAGE_TOKEN_INDEX, 5, 6, 7], [1, IMAGE_TOKEN_INDEX, 8, 9, 2]]),
        "labels": torch.tensor([[-100, -100, 5, 6, 7], [-100, -100, 8, -100, -100]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool),  # the second padded
        "pixel_values": torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1)),
    }
    loss = model(data, mode="loss")["loss"]
    loss.backward()
    return calls, loss.item(), [p.grad for p in model.projector.parameters()]


def test_model_levers_skip_the_vit_backward_and_the_recompute_of_unchecked_layers(synthetic_layout):
    """The mechanism, counted on InternLM2's own code: stock recomputes every LLM layer
    and the ViT in the backward pass; with the levers the ViT runs once, the unchecked
    last layer runs once, the checkpointed first layer still twice, and the loss and the
    projector's gradients are the same numbers."""
    from xtuner.model import LLaVAModel

    from bench.trainer.levered_llava import LeveredLLaVAModel

    stock_calls, stock_loss, stock_grads = _one_training_step(synthetic_layout, LLaVAModel)
    calls, loss, grads = _one_training_step(
        synthetic_layout, LeveredLLaVAModel, skip_vit_backward=True, unchecked_llm_layers=1
    )
    assert stock_calls["llm.0"] == stock_calls["llm.1"] == stock_calls["vit.0"] == 2
    assert (calls["llm.0"], calls["llm.1"], calls["vit.0"]) == (2, 1, 1)
    assert calls["logits"] == stock_calls["logits"]  # every position
    assert loss == stock_loss
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    assert all((g == s).all() for g, s in zip(grads, stock_grads))


def test_labelled_logits_only_computes_the_caption_rows_and_the_same_loss(synthetic_layout):
    """Stock projects every position (image tokens included) to the vocabulary; the
    lever projects the 4 positions that predict the 4 labelled tokens, and the loss
    and the projector's gradients agree with stock's to float32 rounding (a matmul
    of 4 rows sums in another order than one of all rows)."""
    import torch
    from xtuner.model import LLaVAModel

    from bench.trainer.levered_llava import LeveredLLaVAModel

    stock_calls, stock_loss, stock_grads = _one_training_step(synthetic_layout, LLaVAModel)
    calls, loss, grads = _one_training_step(synthetic_layout, LeveredLLaVAModel, labelled_logits_only=True)
    assert calls["logits"] == 4 < stock_calls["logits"]  # 2 x (4 text positions plus the image's)
    assert loss == pytest.approx(stock_loss, rel=1e-6)
    assert all(torch.allclose(g, s, rtol=1e-4, atol=1e-6) for g, s in zip(grads, stock_grads))


def test_sdpa_attention_is_the_same_function_as_internlm2s_eager_attention(synthetic_layout):
    """The attention lever builds the model code's own SDPA class; its loss and the
    projector's gradients agree with the eager attention's to float32 rounding (the
    fused kernel sums the softmax in another order), on a batch with padding."""
    import torch
    from xtuner.model import LLaVAModel

    _, eager_loss, eager_grads = _one_training_step(synthetic_layout, LLaVAModel)
    _, loss, grads = _one_training_step(synthetic_layout, LLaVAModel, attention="sdpa")
    assert loss == pytest.approx(eager_loss, rel=1e-6)
    assert all(torch.allclose(g, s, rtol=1e-4, atol=1e-6) for g, s in zip(grads, eager_grads))


def test_model_levers_keep_the_loss_curve(synthetic_layout, tmp_path):
    """Two real CPU runs, stock and every model lever: the same losses (to float32
    rounding, which the labelled-only logits and SDPA change)."""
    curves = []
    model_levers = ["--skip-vit-backward", "--unchecked-llm-layers", "1", "--labelled-logits-only", "--sdpa-attention"]
    for levers in (["--stock"], model_levers):
        done = _cpu_run(synthetic_layout, tmp_path, *levers)
        assert done.returncode == 0, done.stderr[-3000:]
        verdict = json.loads(done.stdout)
        curves.append([point["loss"] for point in verdict["result"]["curve"]])
    levers = verdict["recipe"]["levers"]
    assert levers["skip_vit_backward"] and levers["unchecked_llm_layers"] == 1 and levers["labelled_logits_only"]
    assert levers["sdpa_attention"]
    assert curves[1] == pytest.approx(curves[0], rel=1e-5)


def test_a_layout_for_start_up_timing_holds_more_records_than_images(tmp_path):
    """`perf --records 558128` times the start-up with LLaVA-Pretrain's record count
    without writing as many images: the extra records reuse the images in turn."""
    from bench.synth.spec import SynthSpec
    from bench.synth.writer import write_synthetic_layout
    from entrypoint.preflight.deep import record_problems
    from entrypoint.preflight.layout_checks import check_layout

    layout = write_synthetic_layout(tmp_path / "llava", SynthSpec(samples=512, records=1300, llm_train_steps=1))
    records = json.loads(layout.dataset_json.read_text())
    assert len(records) == 1300 and len({r["id"] for r in records}) == 1300
    assert len({r["image"] for r in records}) == 512 == len(list(layout.image_folder.rglob("*.jpg")))
    assert records[512]["conversations"] == records[0]["conversations"]
    assert check_layout(layout) == [] and record_problems(records, layout.dataset_json) == []


@pytest.mark.parametrize("holders, cached", [((0, 1), True), ((1,), False)])
def test_every_rank_takes_the_cached_path_or_none_does(tmp_path, holders, cached):
    """A real torchrun of two gloo ranks: where only one rank sees a complete cache (a
    node whose results folder lacks it), both tokenize, since XTuner's tokenization is
    collective; where all see it, all load it."""
    for rank in holders:
        (tmp_path / f"rank{rank}").mkdir()
        (tmp_path / f"rank{rank}" / COMPLETENESS_RECORD).write_text('{"files": {}}')
    done = torchrun_gloo("cache_agreement_worker.py", 2, str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    assert [json.loads((tmp_path / f"answer{rank}.json").read_text()) for rank in (0, 1)] == [cached, cached]


def _first_projector_gradient(layout: Path, attention: str, dtype, layers: int = 16, hidden: int = 256):
    """The projector's gradient of one forward and backward in ``dtype``: InternLM2's own
    code, ``layers`` deep at width ``hidden`` with random weights (std 0.02), on a padded
    batch of 4 with 48 tokens each; the same weights and batch for every call."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, CLIPVisionModel
    from xtuner.model import LLaVAModel
    from xtuner.utils import IMAGE_TOKEN_INDEX

    paths = Layout.at(layout)
    config = AutoConfig.from_pretrained(paths.llm_dir, trust_remote_code=True)
    config.num_hidden_layers, config.hidden_size, config.intermediate_size = layers, hidden, hidden * 8 // 3
    config.num_attention_heads, config.num_key_value_heads, config.attn_implementation = (
        hidden // 32,
        hidden // 128,
        attention,
    )
    llm = AutoModelForCausalLM.from_config(config, trust_remote_code=True, attn_implementation=attention)
    torch.manual_seed(7)
    for _, parameter in sorted(llm.named_parameters()):
        torch.nn.init.normal_(parameter, std=0.02) if parameter.dim() == 2 else torch.nn.init.ones_(parameter)
    torch.manual_seed(0)  # the projector's initial weights
    model = (
        LLaVAModel(
            llm=llm,
            visual_encoder=CLIPVisionModel.from_pretrained(paths.clip_dir),
            freeze_llm=True,
            freeze_visual_encoder=True,
        )
        .train()
        .to(dtype)
    )
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, config.vocab_size - 1, (4, 48), generator=generator)
    ids[:, 0], ids[:, 1] = 1, IMAGE_TOKEN_INDEX
    labels, mask = ids.clone(), torch.ones(4, 48, dtype=torch.bool)
    labels[:, :2], labels[1, 30:], mask[1, 30:] = -100, -100, False  # the second sample padded
    size = model.visual_encoder.config.image_size
    pixels = torch.randn(4, 3, size, size, generator=generator).to(dtype)
    model({"input_ids": ids, "labels": labels, "attention_mask": mask, "pixel_values": pixels}, mode="loss")[
        "loss"
    ].backward()
    return torch.cat([p.grad.double().flatten() for p in model.projector.parameters()])


def test_sdpa_in_half_precision_is_as_near_the_exact_gradient_as_eager_attention(synthetic_layout):
    """In fp16 and bf16 eager and SDPA attention round differently, and their first
    projector gradients differ by about as much as each differs from the exact (float64)
    one; so a half-precision difference from stock alone cannot tell rounding from a
    changed function. Held against the exact gradient, SDPA is no farther from it than
    stock's eager attention: the same function (in float64 they agree to eager's float32
    softmax), rounded in another order. A lever that changed the function would be far
    outside."""
    import torch

    exact = _first_projector_gradient(synthetic_layout, "sdpa", torch.float64)
    distance = lambda gradient: float((gradient - exact).norm() / exact.norm())  # noqa: E731
    assert distance(_first_projector_gradient(synthetic_layout, "eager", torch.float64)) < 1e-6
    for dtype in (torch.float16, torch.bfloat16):
        eager, sdpa = (distance(_first_projector_gradient(synthetic_layout, a, dtype)) for a in ("eager", "sdpa"))
        assert 0 < sdpa < 1.5 * eager, (dtype, sdpa, eager)


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
