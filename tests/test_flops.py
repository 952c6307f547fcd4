"""The FLOP model against a hand calculation, and MFU on the recorded H200 streams."""
from __future__ import annotations

import statistics

import pytest

from bench import flops
from bench import verdict as verdict_mod
from bench.metrics import read_stream
from tests.conftest import DATA
from tests.test_verdict import context


def test_internlm2_20b_linear_parameters_by_hand():
    # qkv: 6144 x (6144 + 2 x 8 heads x 128) = 50,331,648; o: 6144^2 = 37,748,736;
    # gate/up/down: 3 x 6144 x 16384 = 301,989,888 -> 390,070,272 per layer.
    assert flops.INTERNLM2_20B.linear_params_per_layer == 390_070_272
    # 48 layers + embedding + LM head (2 x 6144 x 92544) ~ 19.86 B parameters, as published.
    total = 48 * 390_070_272 + 2 * 6144 * 92544
    assert total / 1e9 == pytest.approx(19.86, abs=0.01)


def test_one_step_at_batch_32_by_hand():
    """Batch 32, 58 padded text tokens + 576 image tokens = 634 per sample."""
    s, h, L, V = 634, 6144, 48, 92544
    linear = 2 * 390_070_272 * s * L  # 2 FLOPs per parameter and token
    attention = 2 * s * s * h * L  # causal: half of QK^T + AV (4 s^2 h)
    head = 2 * h * V * s
    llm = (linear + attention + head) + (linear + 2 * attention + head)  # forward + input-gradient backward
    # ViT-L/14-336 forward: patch embedding 2*(3*14*14)*1024*576, then 24 layers over 577 tokens of
    # 2*(4*1024^2 + 2*1024*4096) linear FLOPs per token and 4*577^2*1024 attention FLOPs.
    vit = 2 * 588 * 1024 * 576 + 24 * (2 * (4 * 1024**2 + 2 * 1024 * 4096) * 577 + 4 * 577**2 * 1024)
    projector = 3 * 2 * (1024 * 6144 + 6144 * 6144) * 576  # trained: forward x 3
    expected = 32 * (llm + vit + projector)
    step = flops.step_flops(32, 58)
    assert step.sequence_length == 634
    assert step.model_flops == pytest.approx(expected, rel=1e-12)
    assert step.hardware_flops == pytest.approx(expected + 32 * (linear + attention + head), rel=1e-12)
    assert step.model_flops == pytest.approx(1.6054e15, rel=1e-4)  # ~50.2 TFLOP per sample


def test_no_recompute_without_activation_checkpointing():
    step = flops.step_flops(32, 58, activation_checkpointing=False)
    assert step.hardware_flops == step.model_flops


@pytest.mark.parametrize(
    "name, peak",
    [("NVIDIA H200", 989.0), ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
     ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L40S", 362.0), ("NVIDIA GeForce RTX 4090", None), (None, None)],
)  # fmt: skip
def test_peak_table(name, peak):
    assert flops.peak_tflops(name) == peak


@pytest.mark.parametrize("stream, peak_memory", [("h200_stock_nf4_b32_20bshape.jsonl", 49451), ("h200_stock_bf16_b32_20bshape.jsonl", 75949)])
def test_mfu_on_the_recorded_h200_streams(stream, peak_memory):
    records = read_stream(DATA / stream)
    built = verdict_mod.build(context(), records)  # 2 x H200, batch 32, real 20B shapes
    window = records.records[1:]
    seconds = statistics.fmean(r.time for r in window)
    text = statistics.fmean(r.tokens_per_sec * r.time / 32 for r in window)
    expected_flops = flops.step_flops(64, text).model_flops
    throughput = built["throughput"]
    assert throughput["flops_per_step"] == pytest.approx(expected_flops)
    assert throughput["mfu"] == pytest.approx(expected_flops / seconds / 2 / 989e12)
    assert 0.15 < throughput["mfu"] < 0.40  # ~25 % NF4, ~30 % bf16: the frozen 20B LLM dominates
    assert throughput["flop_model"]["image_tokens_per_sample"] == 576
    assert throughput["tokens_per_second"] == pytest.approx((text + 576) * 64 / seconds)
    assert throughput["xtuner_reported"]["tflops_per_device"] == pytest.approx(statistics.fmean(r.tflops for r in window))
    assert throughput["peak_memory_mib"] == peak_memory
    # Ours counts image tokens and no weight gradients; XTuner's counts text only.
    assert throughput["flop_model"]["achieved_tflops_per_device"] > throughput["xtuner_reported"]["tflops_per_device"]
    baseline = built["baseline"]
    assert baseline["speedup_vs_seed_a100"] == pytest.approx((32 / seconds) / (32 / verdict_mod.SEED_A100_SECONDS_PER_STEP))


def test_seed_baseline_constant_is_the_mean_of_the_seed_lines():
    seed = read_stream(DATA / "seed_a100_metrics.jsonl").records
    assert verdict_mod.SEED_A100_SECONDS_PER_STEP == pytest.approx(statistics.fmean(r.time for r in seed), rel=1e-12)


def test_mfu_is_null_with_a_reason_for_an_unknown_gpu():
    environment = {"software": context().environment["software"], "gpus": [
        {"node_rank": 0, "index": 0, "name": "Mystery Accelerator", "memory_mib": 1, "driver": None, "uuid": None}]}  # fmt: skip
    built = verdict_mod.build(context(environment=environment), read_stream(DATA / "h200_stock_nf4_b32_20bshape.jsonl"))
    assert built["throughput"]["mfu"] is None
    assert built["throughput"]["flops_per_step"] is not None
    assert "no dense bf16/fp16 peak" in built["throughput"]["flop_model"]["why_null"]


def test_startup_is_first_record_minus_its_interval():
    records = read_stream(DATA / "h200_stock_nf4_b32_20bshape.jsonl")
    built = verdict_mod.build(context(), records)
    first = records.records[0]
    assert built["timing"]["startup_seconds"] == pytest.approx(130.0 - first.iter * first.time)
    assert built["timing"]["launch_to_first_step_seconds"] == pytest.approx(12.5 + 130.0 - first.iter * first.time)
