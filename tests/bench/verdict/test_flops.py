"""The FLOP model against a hand calculation, and MFU on the recorded H200 streams."""

from __future__ import annotations

import json
import statistics

import pytest

from bench.core.shapes import INTERNLM2_20B
from bench.core.statuses import Criteria
from bench.verdict import document as verdict_mod
from bench.verdict import flops
from bench.verdict.metrics import MetricsStream, parse_stream, read_stream
from bench.verdict.sections import SEED_A100_SECONDS_PER_STEP
from tests.bench.verdict.test_verdict import context
from tests.conftest import DATA


def test_internlm2_20b_linear_parameters_by_hand():
    # qkv: 6144 x (6144 + 2 x 8 heads x 128) = 50,331,648; o: 6144^2 = 37,748,736;
    # gate/up/down: 3 x 6144 x 16384 = 301,989,888 -> 390,070,272 per layer.
    assert INTERNLM2_20B.linear_params_per_layer == 390_070_272
    # 48 layers + embedding + LM head (2 x 6144 x 92544) ~ 19.86 B parameters, as published.
    total = 48 * 390_070_272 + 2 * 6144 * 92544
    assert total / 1e9 == pytest.approx(19.86, abs=0.01)


def _by_hand(s, labelled, checkpointed_layers, vit_backward, head_rows):
    """One sample of batch-32 pretraining, term by term (InternLM2-20B, ViT-L/14-336)."""
    h, L, V = 6144, 48, 92544
    linear = 2 * 390_070_272 * s * L  # 2 FLOPs per parameter and token
    attention = 2 * s * s * h * L  # causal: half of QK^T + AV (4 s^2 h)
    llm = (linear + attention) + (linear + 2 * attention)  # forward + input-gradient backward
    head = 2 * h * V
    # ViT-L/14-336 forward: patch embedding 2*(3*14*14)*1024*576, then 24 layers over 577 tokens of
    # 2*(4*1024^2 + 2*1024*4096) linear FLOPs per token and 4*577^2*1024 attention FLOPs.
    embedding = 2 * 588 * 1024 * 576
    vit_linear = 24 * 2 * (4 * 1024**2 + 2 * 1024 * 4096) * 577
    vit_attention = 24 * 4 * 577**2 * 1024
    projector = 2 * (1024 * 6144 + 6144 * 6144) * 576
    model = llm + 2 * head * labelled + embedding + vit_linear + vit_attention + 3 * projector
    hardware = model + (linear + attention) * checkpointed_layers / L + 2 * head * (head_rows - labelled)
    if vit_backward:
        hardware += (vit_linear + vit_attention) + (vit_linear + 2 * vit_attention) + projector
    return model, hardware


def test_one_stock_step_at_batch_32_by_hand():
    """Batch 32, 58 padded text tokens + 576 image tokens = 634 a sample, 20 of them labelled."""
    model, hardware = _by_hand(634, 20, 48, True, 634)
    step = flops.step_flops(32, 58, 20)
    assert step.sequence_length == 634
    assert step.model_flops == pytest.approx(32 * model, rel=1e-12)
    assert step.hardware_flops == pytest.approx(32 * hardware, rel=1e-12)
    assert step.model_flops == pytest.approx(1.5607e15, rel=1e-4)  # ~48.8 TFLOP a sample


def test_the_levers_change_the_hardware_flops_not_the_model_flops():
    """17 layers unchecked, the ViT without backward, the logits at the labelled rows:
    the same model FLOPs (what the math needs), fewer executed."""
    work = flops.RecipeWork(checkpointed_llm_layers=31, vit_backward=False, head_at_every_position=False)
    levered = flops.step_flops(32, 58, 20, work=work)
    model, hardware = _by_hand(634, 20, 31, False, 20)
    assert levered.model_flops == flops.step_flops(32, 58, 20).model_flops
    assert levered.hardware_flops == pytest.approx(32 * hardware, rel=1e-12)
    assert levered.hardware_flops < flops.step_flops(32, 58, 20).hardware_flops
    nothing_more = flops.RecipeWork(checkpointed_llm_layers=0, vit_backward=False, head_at_every_position=False)
    assert flops.step_flops(32, 58, 20, work=nothing_more).hardware_flops == pytest.approx(levered.model_flops)


def test_recipe_work_comes_from_the_recorded_levers():
    levers = {"unchecked_llm_layers": 17, "skip_vit_backward": True, "labelled_logits_only": True}
    assert flops.RecipeWork.of(levers, 48) == flops.RecipeWork(31, False, False)
    assert flops.RecipeWork.of({"unchecked_llm_layers": 70}, 2) == flops.RecipeWork(
        0, True, True
    )  # all of a tiny model's
    assert flops.RecipeWork.of({**levers, "unchecked_llm_layers": 2, "selective_llm_layers": 46}, 48) == (
        flops.RecipeWork(46, False, False, 46)
    )


def test_a_selective_layer_recomputes_its_forward_less_its_mlp():
    """The MLP is gate, up and down (3 x hidden x ffn of a layer's linear parameters);
    a layer that keeps their outputs recomputes the rest of its forward."""
    whole = flops.RecipeWork(1, False, False)
    selective = flops.RecipeWork(1, False, False, 1)
    none = flops.RecipeWork(0, False, False)
    recompute = [flops.step_flops(32, 49, 17, work=work).hardware_flops for work in (whole, selective, none)]
    llm = flops.INTERNLM2_20B
    mlp_share = 3 * llm.hidden * llm.ffn / llm.linear_params_per_layer
    assert recompute[1] - recompute[2] < (recompute[0] - recompute[2]) * (1 - mlp_share) * 1.05
    assert recompute[1] - recompute[2] > (recompute[0] - recompute[2]) * (1 - mlp_share)


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H200", 989.0),
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA GeForce RTX 4090", None),
        (None, None),
    ],
)
def test_peak_table(name, peak):
    assert flops.peak_tflops(name) == peak


def with_token_counts(name: str, text: float, labelled: float) -> MetricsStream:
    """A recorded H200 stream with the running means TokenCountHook logs added to each
    line (the stream predates the hook; the counts are set by the test)."""
    lines = []
    for line in (DATA / name).read_text().splitlines():
        record = json.loads(line)
        lines.append(json.dumps({**record, "text_tokens_per_sample": text, "labelled_tokens_per_sample": labelled}))
    return parse_stream("\n".join(lines))


@pytest.mark.parametrize(
    "stream, peak_memory", [("h200_stock_nf4_b32_20bshape.jsonl", 49451), ("h200_stock_bf16_b32_20bshape.jsonl", 75949)]
)
def test_mfu_on_the_recorded_h200_streams(stream, peak_memory):
    records = with_token_counts(stream, 56.0, 21.0)
    built = verdict_mod.build(context(), records)  # 2 x H200, batch 32, real 20B shapes, stock levers
    window = records.records[1:]
    seconds = statistics.fmean(r.time for r in window)
    expected_flops = flops.step_flops(64, 56.0, 21.0).model_flops
    throughput = built["throughput"]
    assert throughput["flop_model"]["text_tokens_source"] == "logged"
    assert throughput["flops_per_step"] == pytest.approx(expected_flops)
    assert throughput["mfu"] == pytest.approx(expected_flops / seconds / 2 / 989e12)
    assert throughput["flop_model"]["hfu"] == pytest.approx(
        flops.step_flops(64, 56.0, 21.0).hardware_flops / seconds / 2 / 989e12
    )
    assert 0.15 < throughput["mfu"] < 0.40  # ~25 % NF4, ~30 % bf16: the frozen 20B LLM dominates
    assert throughput["flop_model"]["image_tokens_per_sample"] == 576
    assert throughput["tokens_per_second"] == pytest.approx((56 + 576) * 64 / seconds)
    assert throughput["xtuner_reported"]["tflops_per_device"] == pytest.approx(
        statistics.fmean(r.tflops for r in window)
    )
    assert throughput["peak_memory_mib"] == peak_memory
    # Ours counts image tokens and no weight gradients; XTuner's counts text only.
    assert throughput["flop_model"]["achieved_tflops_per_device"] > throughput["xtuner_reported"]["tflops_per_device"]
    baseline = built["baseline"]
    assert baseline["speedup_vs_seed_a100"] == pytest.approx((32 / seconds) / (32 / SEED_A100_SECONDS_PER_STEP))


def test_a_stream_without_token_counts_has_no_flops_and_says_why():
    built = verdict_mod.build(context(), read_stream(DATA / "h200_stock_nf4_b32_20bshape.jsonl"))
    flop_model = built["throughput"]["flop_model"]
    assert built["throughput"]["flops_per_step"] is None and built["throughput"]["mfu"] is None
    assert "TokenCountHook" in flop_model["why_null"]
    assert flop_model["text_tokens_source"] == "estimated" and flop_model["text_tokens_per_sample"] > 0


def test_seed_baseline_constant_is_the_mean_of_the_seed_lines():
    seed = read_stream(DATA / "seed_a100_metrics.jsonl").records
    assert SEED_A100_SECONDS_PER_STEP == pytest.approx(statistics.fmean(r.time for r in seed), rel=1e-12)


def test_mfu_is_null_with_a_reason_for_an_unknown_gpu():
    environment = {
        "software": context().environment["software"],
        "gpus": [
            {"node_rank": 0, "index": 0, "name": "Mystery Accelerator", "memory_mib": 1, "driver": None, "uuid": None}
        ],
    }
    built = verdict_mod.build(
        context(environment=environment), with_token_counts("h200_stock_nf4_b32_20bshape.jsonl", 56.0, 21.0)
    )
    assert built["throughput"]["mfu"] is None
    assert built["throughput"]["flops_per_step"] is not None
    assert "no dense bf16/fp16 peak" in built["throughput"]["flop_model"]["why_null"]


def test_startup_is_first_record_minus_its_interval():
    records = read_stream(DATA / "h200_stock_nf4_b32_20bshape.jsonl")
    built = verdict_mod.build(context(), records)
    first = records.records[0]
    assert built["timing"]["startup_seconds"] == pytest.approx(130.0 - first.iter * first.time)
    assert built["timing"]["launch_to_first_step_seconds"] == pytest.approx(12.5 + 130.0 - first.iter * first.time)


def test_time_to_target_and_the_projected_run_come_from_the_stream():
    """Crossing at iteration 10 (loss 12.6336 < 12.64): start-up, then 5 iterations at
    the first interval's mean time and 5 at the second's; max_steps 15 projected at the
    steady window's mean time per step."""
    records = read_stream(DATA / "h200_stock_nf4_b32_20bshape.jsonl")
    built = verdict_mod.build(context(criteria=Criteria(target_loss=12.64, max_steps=15)), records)
    first, second = records.records[:2]
    startup = 130.0 - first.iter * first.time
    assert built["result"]["first_step_below_target"] == 10
    assert built["timing"]["time_to_target_seconds"] == pytest.approx(startup + 5 * first.time + 5 * second.time)
    mean = built["throughput"]["seconds_per_step"]["mean"]
    assert built["timing"]["projected_max_steps_seconds"] == pytest.approx(startup + 15 * mean)
    assert verdict_mod.build(context(), records)["timing"]["time_to_target_seconds"] is None  # 2.3: never crossed
