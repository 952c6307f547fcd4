"""The verdict's derived sections, each a pure function of the run's recorded inputs:
the judgement, throughput with the FLOP model, the comparison with the seed's A100
run, and timing (docs/VERDICT.md)."""

from __future__ import annotations

import math
from dataclasses import asdict

from bench.core import shapes as shapes_mod
from bench.verdict import flops as flops_mod
from bench.verdict import throughput as throughput_mod
from bench.verdict.judgement import Judgement, log_interval
from bench.verdict.metrics import MetricsStream
from bench.verdict.run_context import RunContext

STEADY_WINDOW_RULE = "all logged intervals but the first (start-up); the only one if there is one"


# The seed's A100 run (its metrics lines, iterations 360-380): mean s/step at batch 32 per GPU.
SEED_A100_SECONDS_PER_STEP = 14.258836038907369

SEED_A100_PER_DEVICE_BATCH = 32

FLOP_FORMULA = (
    "per sample, s = padded text tokens + image tokens, l = labelled tokens: model FLOPs = frozen LLM forward "
    "2*P_linear*s + 2*s^2*h*L (causal) and its input-gradient backward 2*P_linear*s + 4*s^2*h*L, the LM head at the "
    "labelled rows 2*h*V*l forward and backward, the frozen ViT forward, the projector forward x3 (input and weight "
    "gradients); hardware FLOPs add what the recipe executes beyond that: each checkpointed LLM layer's forward again, "
    "the LM head at all s rows unless the labelled-only logits lever is on, and, unless the ViT lever is on, the ViT's "
    "layers recomputed and backpropagated (linear once, attention twice) and the projector recomputed; NF4 counts as "
    "dense"
)


def finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def judgement_section(judgement: Judgement, skipped_lines: int) -> dict:
    return {
        "steps_completed": judgement.steps_completed,
        "first_step_below_target": judgement.first_step_below_target,
        "loss_at_crossing": judgement.loss_at_crossing,
        "final_loss": finite_or_none(judgement.final_loss),
        "min_loss": judgement.min_loss,
        "stayed_below_after_crossing": judgement.stayed_below_after_crossing,
        "curve": [
            {"iter": p.iter, "step": p.step, "loss": finite_or_none(p.loss), "finite": math.isfinite(p.loss)}
            for p in judgement.curve
        ],
        "skipped_metric_lines": skipped_lines,
    }


def flops_section(context: RunContext, measured, samples_per_step: int) -> dict:
    """Our FLOP model and MFU; null figures carry the reason."""
    shapes = (context.inputs or {}).get("model_shapes")
    gpus = (context.environment or {}).get("gpus") or []
    peak = flops_mod.peak_tflops(gpus[0]["name"] if gpus else None)
    levers = (context.recipe or {}).get("levers")
    layers = shapes["llm"]["layers"] if shapes else shapes_mod.INTERNLM2_20B.layers
    work = flops_mod.RecipeWork.of(levers, layers) if levers else flops_mod.STOCK_WORK
    section = {
        "formula": FLOP_FORMULA,
        "text_tokens_per_sample": measured.text_tokens_per_sample,
        "text_tokens_source": measured.text_tokens_source,
        "labelled_tokens_per_sample": measured.labelled_tokens_per_sample,
        "image_tokens_per_sample": None,
        "recipe_work": {**asdict(work), "from": "recipe.levers" if levers else "not recorded: stock assumed"},
        "flops_per_step": None,
        "hardware_flops_per_step": None,
        "achieved_tflops_per_device": None,
        "peak_tflops_per_device": peak,
        "mfu": None,
        "hfu": None,
        "why_null": None,
    }
    if shapes is None or measured.seconds_per_step_mean is None:
        section["why_null"] = "model shapes or the time per step were not recorded"
        return section
    if measured.labelled_tokens_per_sample is None:
        section["why_null"] = "the metrics stream does not log the tokens a sample (the appliance's TokenCountHook)"
        return section
    vit = shapes_mod.ViTShape(**shapes["vit"])
    step = flops_mod.step_flops(
        samples_per_step,
        measured.text_tokens_per_sample,
        measured.labelled_tokens_per_sample,
        shapes_mod.LLMShape(**shapes["llm"]),
        vit,
        work,
    )
    achieved = step.model_flops / measured.seconds_per_step_mean / context.world_size / 1e12
    section.update(
        image_tokens_per_sample=vit.patches,
        flops_per_step=step.model_flops,
        hardware_flops_per_step=step.hardware_flops,
        achieved_tflops_per_device=achieved,
    )
    if peak is None:
        section["why_null"] = "no dense bf16/fp16 peak is known for this GPU" if gpus else "not run on a GPU"
    else:
        section.update(mfu=achieved / peak, hfu=achieved * step.hardware_flops / step.model_flops / peak)
    return section


def throughput_section(context: RunContext, stream: MetricsStream) -> dict | None:
    if context.per_device_batch is None or context.world_size is None:
        return None
    measured = throughput_mod.measure(
        stream.records, context.accumulative_counts, context.per_device_batch, context.world_size
    )
    samples_per_step = context.per_device_batch * context.accumulative_counts * context.world_size
    flop_model = flops_section(context, measured, samples_per_step)
    tokens_per_sample = (
        None
        if flop_model["image_tokens_per_sample"] is None
        else measured.text_tokens_per_sample + flop_model["image_tokens_per_sample"]
    )
    return {
        "window": {
            "first_step": measured.window_first_step,
            "last_step": measured.window_last_step,
            "logged_intervals": measured.logged_intervals,
            "log_interval": log_interval(stream.records),
            "rule": STEADY_WINDOW_RULE,
        },
        "seconds_per_step": {
            "mean": measured.seconds_per_step_mean,
            "median": measured.seconds_per_step_median,
            "p95": measured.seconds_per_step_p95,
        },
        "samples_per_second_per_device": measured.samples_per_second_per_device,
        "samples_per_second": measured.samples_per_second,
        "tokens_per_second": (None if tokens_per_sample is None else tokens_per_sample * measured.samples_per_second),
        "data_time_share": measured.data_time_share,
        "peak_memory_mib": measured.peak_memory_mib,
        "flops_per_step": flop_model["flops_per_step"],
        "mfu": flop_model["mfu"],
        "flop_model": flop_model,
        "xtuner_reported": {
            "tflops_per_device": measured.xtuner_tflops_per_device,
            "tokens_per_second_per_device": measured.xtuner_tokens_per_second_per_device,
        },
    }


def baseline_section(context: RunContext, throughput: dict | None) -> dict:
    """Per-GPU speed against the seed's A100 run: only for GPU runs of the real model shapes."""
    seed = SEED_A100_PER_DEVICE_BATCH / SEED_A100_SECONDS_PER_STEP
    section = {
        "seed_a100_seconds_per_step": SEED_A100_SECONDS_PER_STEP,
        "seed_a100_per_device_batch": SEED_A100_PER_DEVICE_BATCH,
        "seed_a100_samples_per_second_per_device": seed,
        "speedup_vs_seed_a100": None,
        "why_null": None,
    }
    if context.demo:
        section["why_null"] = "a demo run of tiny models"
    elif (context.recipe or {}).get("device") != "cuda":
        section["why_null"] = "not run on GPUs"
    elif not shapes_mod.are_real_shapes((context.inputs or {}).get("model_shapes")):
        section["why_null"] = "the models are not InternLM2-20B and CLIP ViT-L/14-336"
    elif not throughput or throughput["samples_per_second_per_device"] is None:
        section["why_null"] = "no throughput was measured"
    else:
        section["speedup_vs_seed_a100"] = throughput["samples_per_second_per_device"] / seed
    return section


# The timing figures build derives from the recorded ones (not recorded themselves).
DERIVED_TIMING = (
    "startup_seconds",
    "launch_to_first_step_seconds",
    "time_to_target_seconds",
    "projected_max_steps_seconds",
)


def before_the_trainer(timing: dict) -> float | None:
    """The appliance's launch to the trainer's: preflight, and an out-of-memory retry's
    first attempt and its re-launch (0 without one); None without the preflight time."""
    preflight = timing.get("preflight_seconds")
    return None if preflight is None else preflight + (timing.get("earlier_attempts_seconds") or 0.0)


def timing_section(
    context: RunContext, stream: MetricsStream, crossing_iter: int | None, seconds_per_step: float | None
) -> dict | None:
    """Recorded times plus what follows from them and the stream, all from the trainer's
    launch: start-up (to the first step: the first record's arrival minus the iterations
    its interval spent), with preflight before it the appliance's launch to the first
    step; the time to the record that first crossed the target (start-up plus every
    logged interval up to it, each interval's iterations times its mean time); and
    max_steps projected at the steady window's time per step."""
    if context.timing is None:
        return None
    startup = None
    first_seconds = context.timing.get("first_record_seconds")
    records = sorted({r.iter: r for r in stream.records}.values(), key=lambda r: r.iter)
    if first_seconds is not None and records and records[0].time is not None:
        startup = max(0.0, first_seconds - records[0].iter * records[0].time)
    before = before_the_trainer(context.timing)
    to_target = None
    if startup is not None and crossing_iter is not None:
        spent, previous = 0.0, 0
        for record in records:
            if record.iter > crossing_iter or record.time is None:
                break
            spent, previous = spent + (record.iter - previous) * record.time, record.iter
        to_target = startup + spent if previous == crossing_iter else None
    projected = None
    if startup is not None and seconds_per_step is not None:
        projected = startup + context.criteria.max_steps * seconds_per_step
    return {
        **context.timing,
        "startup_seconds": startup,
        "launch_to_first_step_seconds": None if startup is None or before is None else before + startup,
        "time_to_target_seconds": to_target,
        "projected_max_steps_seconds": projected,
    }
