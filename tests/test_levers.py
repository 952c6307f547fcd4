"""Speed levers: which apply where, how they render, and that they keep the math.

The dequantized-NF4 lever needs CUDA and bitsandbytes' GPU kernels; its loss-curve
agreement with stock NF4 is checked on the GPU machine (tests/test_gpu.py).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import verdict as verdict_mod
from bench.layout import Layout
from bench.levers import STOCK, LeverRequest, Levers, resolve_levers, tokenized_cache_folder
from bench.recipe import RecipeOptions, render
from bench.synth import DEMO_PER_DEVICE_BATCH
from tests.conftest import llava_bench

H100 = [81559] * 8
A100_40 = [40960] * 8
# name: (request, device, precision, GPU memory, expected levers, problem words)
CASES = {
    "CPU: nothing on": (LeverRequest(), "cpu", "nf4", [], STOCK, None),
    "80 GB GPUs, NF4: everything on": (LeverRequest(), "cuda", "nf4", H100, Levers(4, True, True), None),
    "40 GB GPUs, NF4: weights stay 4-bit": (LeverRequest(), "cuda", "nf4", A100_40, Levers(4, True, False), None),
    "bf16: nothing to dequantize": (LeverRequest(), "cuda", "bf16", H100, Levers(4, True, False), None),
    "--stock: the pinned config": (LeverRequest(stock=True), "cuda", "nf4", H100, STOCK, None),
    "--stock with a lever: refused": (LeverRequest(stock=True, dataloader_workers=2), "cuda", "nf4", H100, STOCK, "--stock"),
    "one lever off, the others default": (LeverRequest(dequantize_nf4=False), "cuda", "nf4", H100, Levers(4, True, False), None),
    "forced on a 40 GB GPU (the user's call)": (LeverRequest(dequantize_nf4=True), "cuda", "nf4", A100_40, Levers(4, True, True), None),
    "dequantize asked on CPU: refused": (LeverRequest(dequantize_nf4=True), "cpu", "nf4", [], STOCK, "--dequantize-nf4"),
    "workers on CPU when asked": (LeverRequest(dataloader_workers=2, pin_memory=True), "cpu", "nf4", [], Levers(2, True, False), None),
    "tokenized cache on CPU when asked": (LeverRequest(tokenized_cache=True), "cpu", "nf4", [], Levers(tokenized_cache=True), None),
}


@pytest.mark.parametrize("name", list(CASES))
def test_resolve_levers(name):
    request, device, precision, memory, expected, problem = CASES[name]
    levers, problems = resolve_levers(request, device, precision, memory)
    assert levers == expected
    if problem is None:
        assert problems == []
    else:
        assert len(problems) == 1 and problem in problems[0]


def test_levers_render_into_the_config_and_are_listed_as_deviations():
    layout = Layout.at(Path("/llava"))
    options = RecipeOptions(levers=Levers(dataloader_workers=4, pin_memory=True, dequantize_nf4=True))
    recipe = render(layout, options, "test")
    assert "dataloader_num_workers = 4" in recipe.text
    assert "pin_memory=True," in recipe.text
    assert "from bench.levers import from_pretrained_dequantized" in recipe.text
    assert "type=from_pretrained_dequantized," in recipe.text
    assert any("dequantized once" in change for change in recipe.deviations)
    assert render(layout, RecipeOptions(levers=STOCK), "test").sha256 != recipe.sha256


def test_dequantizing_is_refused_where_it_cannot_apply():
    with pytest.raises(ValueError, match="NF4 on GPUs"):
        RecipeOptions(device="cpu", levers=Levers(dequantize_nf4=True))


def test_perf_runs_stock_and_a_lever_back_to_back_and_the_losses_agree(synthetic_layout, tmp_path):
    """`llava-bench perf` on CPU: real runs of the stock recipe and of 2 dataloader
    workers with pinned memory; the same samples in the same order give the same losses."""
    done = llava_bench(
        "perf", "--root", str(synthetic_layout), "--out", str(tmp_path), "--device", "cpu", "--steps", "30",
        "--per-device-batch", str(DEMO_PER_DEVICE_BATCH), "--variant", "stock", "--variant", "workers", "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    stock, workers = json.loads(done.stdout)
    assert (stock["variant"], workers["variant"]) == ("stock", "workers")
    assert stock["levers"]["stock"] is True and stock["ratio_vs_stock"] == 1.0
    assert workers["levers"] == {
        "dataloader_workers": 4, "pin_memory": True, "dequantize_nf4": False, "tokenized_cache": False, "stock": False
    }  # fmt: skip
    assert workers["termination"] == "completed" and workers["seconds_per_step"] > 0
    assert workers["max_loss_difference"] == 0.0  # three logged losses, identical
    report = json.loads((tmp_path / "perf.json").read_text())
    assert [row["variant"] for row in report["rows"]] == ["stock", "workers"]
    assert report["matmul_tflops_per_device"] > 0  # the CPU's fp32 rate here
    assert 0 < stock["limit_seconds_per_step"] < stock["seconds_per_step"]
    assert stock["times_limit"] == stock["seconds_per_step"] / stock["limit_seconds_per_step"]
    for row in report["rows"]:
        verdict_mod.validate(json.loads((Path(row["run_dir"]) / "verdict.json").read_text()))
    again = llava_bench(
        "perf", "--root", str(synthetic_layout), "--out", str(tmp_path), "--device", "cpu", "--steps", "30",
        "--per-device-batch", str(DEMO_PER_DEVICE_BATCH), "--variant", "stock", "--json",
    )  # fmt: skip
    assert again.returncode == 0 and "stock: reusing" in again.stderr  # a finished variant is not run again
    assert json.loads(again.stdout)[0]["run_dir"] == stock["run_dir"]


def test_perf_refuses_an_unknown_variant(tmp_path):
    done = llava_bench("perf", "--root", str(tmp_path), "--variant", "turbo")
    assert done.returncode == 2
    assert "turbo" in done.stderr


def test_the_tokenized_cache_is_reused_by_the_next_run_with_the_same_losses(synthetic_layout, tmp_path):
    """Two real CPU runs with the cache lever: the first tokenizes and saves, the second
    loads; the same tokens give the same losses."""
    verdicts = []
    for _ in range(2):
        done = llava_bench(
            "run", "--root", str(synthetic_layout), "--out", str(tmp_path), "--device", "cpu", "--tokenized-cache",
            "--per-device-batch", str(DEMO_PER_DEVICE_BATCH), "--max-steps", "20", "--target-loss", "1.6", "--json",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        verdicts.append(json.loads(done.stdout))
    (cache,) = (tmp_path / "cache").iterdir()
    assert (cache / "dataset_info.json").is_file() and cache.name.startswith("tokenized-")
    first, second = ([d for d in v["recipe"]["deviations"] if "tokenized dataset" in d] for v in verdicts)
    assert first == [f"tokenized dataset kept in {cache} (saved there for later runs; the same tokens)"]
    assert second == [f"tokenized dataset kept in {cache} (reused from an earlier run; the same tokens)"]
    assert verdicts[0]["recipe"]["levers"]["tokenized_cache"] is True
    assert [p["loss"] for p in verdicts[1]["result"]["curve"]] == [p["loss"] for p in verdicts[0]["result"]["curve"]]


def test_the_cache_folder_changes_with_the_dataset_or_the_tokenizer(layout_copy, tmp_path):
    llm_dir = Layout.at(layout_copy).llm_dir
    folder = tokenized_cache_folder(tmp_path, "a" * 64, llm_dir)
    assert folder == tokenized_cache_folder(tmp_path, "a" * 64, llm_dir)
    assert folder != tokenized_cache_folder(tmp_path, "b" * 64, llm_dir)
    (llm_dir / "tokenizer_config.json").write_text((llm_dir / "tokenizer_config.json").read_text() + " ")
    assert folder != tokenized_cache_folder(tmp_path, "a" * 64, llm_dir)


def test_stock_with_a_lever_option_is_refused_before_training(synthetic_layout, tmp_path):
    done = llava_bench("run", "--root", str(synthetic_layout), "--out", str(tmp_path), "--device", "cpu", "--stock", "--dataloader-workers", "2")
    assert done.returncode == 2
    assert "--stock turns every lever off" in done.stderr
