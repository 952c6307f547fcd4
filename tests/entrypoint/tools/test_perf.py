"""`llava-bench perf`: stock and the levers back to back, and the math check that holds
each variant's projector against stock's (and an exact float32 run's)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bench.core.layout import Layout
from bench.synth.spec import DEMO_PER_DEVICE_BATCH
from bench.verdict import document as verdict_mod
from tests.conftest import CPU, REPO, llava_bench, spawn_run


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
        "selective_llm_layers": 0,
        "labelled_logits_only": False,
        "sdpa_attention": False,
        "fused_rms_norm": False,
        "fused_rotary": False,
        "fused_swiglu": False,
        "grouped_query_sdpa": False,
        "rotary_once": False,
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
    projector's gradients zeroed (a broken lever, tests/entrypoint/tools/zero_projector_gradient.py)
    has a first gradient 100 % away from stock's and ends with the projector where it
    started, far outside stock's noise."""
    from bench.verdict.perf_compare import compare, compare_projectors

    verdicts = {}
    for name in ("stock", "stock-again"):
        done = spawn_run(
            synthetic_layout,
            tmp_path / name,
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
        "from xtuner.model import LLaVAModel\nfrom tests.entrypoint.tools.zero_projector_gradient import "
        "ZeroProjectorGradientLLaVAModel\n",
    )
    # the rendered config names the pristine layout's files; an override must name its own layout's
    Layout.at(layout_copy).config_override.write_text(broken.replace(str(synthetic_layout), str(layout_copy)))
    repo = str(REPO)
    done = spawn_run(
        layout_copy,
        tmp_path / "broken",
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
    a float32 run is neither passed nor failed; with stock-sdpa (stock as the pinned
    commit runs it) its difference is the allowance."""
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
    verdicts["stock-sdpa"] = _saved_projector(tmp_path / "stock-sdpa", initial, gradient * 1.34, initial + 0.02)
    projectors = compare_projectors(verdicts)
    assert (projectors.reference, projectors.allowance_from) == ("exact", "stock-sdpa")
    assert projectors.agrees("default")[0] is True  # 0.33 within twice stock-sdpa's 0.34


def test_perf_refuses_an_unknown_variant(tmp_path):
    done = llava_bench("perf", "--root", str(tmp_path), "--variant", "turbo")
    assert done.returncode == 2
    assert "turbo" in done.stderr


def _row(variant: str, ratio: float | None):
    from dataclasses import fields

    from bench.verdict.perf_compare import PerfRow

    return PerfRow(
        **{f.name: None for f in fields(PerfRow)}
        | {"variant": variant, "termination": "completed", "ratio_vs_stock": ratio}
    )


def test_a_ratio_to_stock_is_printed_with_the_noise_it_stands_on():
    """On CPU two runs of one recipe differed 2 x: the table says how far stock differs
    from itself, and which ratios are within that, or that it was not measured."""
    from bench.verdict.perf_compare import table

    measured = table([_row("stock", 1.0), _row("stock-again", 1.2), _row("workers", 0.9), _row("default", 0.5)])
    assert "stock run again took 1.200 x stock's time, so ratios within 20.0% of 1 are run-to-run noise" in measured
    assert "noise (stock, stock-again, workers)" in measured
    assert "not measured (add --variant stock-again)" in table([_row("stock", 1.0), _row("default", 0.5)])


def test_the_profile_table_gives_each_kind_of_work_its_share_of_the_steps():
    """A profile recorded on 1 x H200 (the NF4 default's steps 6-7, 2026-12-03): the
    table gives each kind's share of the wall time, and the kinds with the recompute
    and the idle time account for it (kernels of one stream, no overlap)."""
    import json
    from dataclasses import replace

    from bench.trainer.step_profile import kind_of
    from bench.verdict.perf_compare import profile_table
    from tests.conftest import DATA

    profile = json.loads((DATA / "h200_profile" / "profile.json").read_text())
    shares = {kind: seconds / profile["wall_seconds"] for kind, seconds in profile["by_kind_seconds"].items()}
    assert sum(shares.values()) + profile["idle_seconds"] / profile["wall_seconds"] == pytest.approx(1.0)
    row = replace(_row("default", None), profile=profile)
    text = profile_table([row, _row("stock", 1.0)])
    assert "c matmul" in text and "default     6-7" in text and f"{shares['matmul']:5.1%}" in text
    assert "stock " not in text.splitlines()[-1]  # unprofiled variants have no line
    assert profile_table([_row("stock", 1.0)]) is None
    assert [kind_of(name) for name in ("nvjet_sm90_tst_192x192", "ncclKernel_AllReduce", "Memcpy HtoD")] == [
        "matmul",
        "communication",
        "copies",
    ]
    assert kind_of("cudnn_generated_fort_native_sdpa_sm90_flash_bprop") == "attention"
    assert kind_of("vectorized_elementwise_kernel<CUDAFunctor_add>") == "elementwise and reductions"
