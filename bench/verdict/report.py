"""Human-readable outputs of a verdict: report.md, loss.png and JUnit XML.

All three are derived from verdict.json (and the copied metrics stream for the
speed plot), so they can be redrawn at any time with ``llava-bench report``.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from bench.verdict.metrics import read_stream
from bench.verdict.sections import before_the_trainer
from bench.verdict.what_ran import what_ran

REPORT_NAME = "report.md"
PLOT_NAME = "loss.png"


def _figure(value, digits: int = 3, unit: str = "") -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}{unit}" if isinstance(value, float) else f"{value}{unit}"


def _significant(value) -> str:
    """Three significant figures: a CPU's 0.0123 TFLOP/s is not shown as 0.0."""
    return "n/a" if value is None else f"{value:.3g}"


def _scientific(value) -> str:
    return "n/a" if value is None else f"{value:.4e}"


def plot(verdict: dict, metrics_path: Path, out: Path) -> str | None:
    """Loss against steps with the target line, and seconds per step; or why there is no plot."""
    curve = verdict["result"]["curve"]
    if not curve:
        return "no loss was logged"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed"
    accumulative_counts = verdict["accumulative_counts"]
    timed = [r for r in read_stream(metrics_path).records if r.time] if metrics_path.exists() else []
    figure, (losses, speed) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    losses.plot([p["step"] for p in curve], [p["loss"] for p in curve], marker=".", label="logged loss")
    losses.axhline(verdict["criteria"]["target_loss"], color="red", linestyle="--", label="target")
    crossing = verdict["result"]["first_step_below_target"]
    if crossing is not None:
        losses.axvline(crossing, color="green", linestyle=":", label=f"first below target (step {crossing})")
    losses.set_ylabel("loss")
    losses.set_title(f"{verdict['run_id']}: {verdict['status']}")
    losses.legend()
    speed.plot([r.step(accumulative_counts) for r in timed], [r.time * accumulative_counts for r in timed], marker=".")
    speed.set_ylabel("seconds per step")
    speed.set_xlabel("optimizer step")
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return None


def markdown(verdict: dict, not_plotted: str | None) -> str:
    criteria, result = verdict["criteria"], verdict["result"]
    throughput = verdict["throughput"] or {}
    flop_model = throughput.get("flop_model") or {}
    speed = throughput.get("seconds_per_step") or {}
    window = throughput.get("window") or {}
    timing = verdict["timing"] or {}
    lines = [
        f"# llava-bench {verdict['run_id']}: {verdict['status'].upper()}",
        "",
        verdict["reason"],
        "",
        *[f"- Note: {note}" for note in verdict["notes"]],
        *([""] if verdict["notes"] else []),
        f"Criteria: logged loss below {criteria['target_loss']} within {criteria['max_steps']} optimizer steps"
        + (" (stop on target)" if criteria["stop_on_target"] else "")
        + (" (demo criteria for the synthetic layout; nothing about hardware)" if criteria["demo"] else "")
        + ".",
        "",
        "## What ran, on what",
        "",
        *[f"- **{label}**: {text}" for label, text in what_ran(verdict)],
        "",
        "## Loss",
        "",
        "| steps completed | first step below target | final loss | minimum loss | stayed below after crossing |",
        "| --- | --- | --- | --- | --- |",
        f"| {result['steps_completed']} | {_figure(result['first_step_below_target'])} | "
        f"{_figure(result['final_loss'], 4)} "
        f"| {_figure(result['min_loss'], 4)} | {_figure(result['stayed_below_after_crossing'])} |",
        "",
        f"![loss and seconds per step]({PLOT_NAME})" if not_plotted is None else f"(loss.png not drawn: {not_plotted})",
        "",
    ]
    if throughput and window.get("first_step") is not None:
        lines += [
            f"## Throughput (steps {window.get('first_step')}-{window.get('last_step')}: {window.get('rule')})",
            "",
            "| figure | value |",
            "| --- | --- |",
            f"| seconds per step, mean / median / p95 | {_figure(speed.get('mean'))} / "
            f"{_figure(speed.get('median'))} / {_figure(speed.get('p95'))} |",
            f"| samples/s per device / cluster, at the mean s/step | "
            f"{_significant(throughput['samples_per_second_per_device'])} / "
            f"{_significant(throughput['samples_per_second'])} |",
            f"| tokens/s incl. image tokens (cluster), at the mean s/step | "
            f"{_significant(throughput['tokens_per_second'])} |",
            f"| data loading share of a step | {_figure(throughput['data_time_share'], 3)} |",
            f"| peak memory MiB | {_figure(throughput['peak_memory_mib'], 0)} |",
            "| launch to first step, s (preflight + earlier attempts + trainer start-up) | "
            f"{_figure(timing.get('launch_to_first_step_seconds'), 1)} "
            f"({_figure(timing.get('preflight_seconds'), 1)} + "
            f"{_figure(timing.get('earlier_attempts_seconds') or 0, 1)} + "
            f"{_figure(timing.get('startup_seconds'), 1)}) |",
            f"| launch to the target, s / to {criteria['max_steps']} steps, projected at the mean s/step | "
            f"{_figure(_from_launch(timing, 'time_to_target_seconds'), 1)} / "
            f"{_figure(_from_launch(timing, 'projected_max_steps_seconds'), 1)} |",
            f"| model FLOPs per step | {_scientific(throughput['flops_per_step'])} |",
            f"| achieved TFLOP/s per device, at the mean s/step | "
            f"{_significant(flop_model.get('achieved_tflops_per_device'))} |",
            f"| MFU / HFU (peak {_figure(flop_model.get('peak_tflops_per_device'), 0)} TFLOP/s) | "
            f"{_significant(flop_model.get('mfu'))} / {_significant(flop_model.get('hfu'))} |",
            "| XTuner's own tflops / tokens_per_sec per device (text only) | "
            f"{_figure(throughput['xtuner_reported']['tflops_per_device'], 1)} / "
            f"{_figure(throughput['xtuner_reported']['tokens_per_second_per_device'], 1)} |",
            "",
            f"FLOP model: {flop_model.get('formula')}."
            + (f" MFU is null: {flop_model['why_null']}." if flop_model.get("why_null") else ""),
            "",
        ]
    baseline = verdict["baseline"]
    if baseline["speedup_vs_seed_a100"] is not None:
        lines += [
            "## Against the seed's A100 run",
            "",
            f"{baseline['speedup_vs_seed_a100']:.2f} x the seed's A100 samples per second per GPU "
            f"({baseline['seed_a100_seconds_per_step']:.2f} s/step at batch {baseline['seed_a100_per_device_batch']}): "
            "a per-GPU speed ratio.",
            "",
        ]
    recipe, topology = verdict.get("recipe"), verdict.get("topology")
    if recipe:
        schedule = (
            "the reference"
            if recipe["on_reference_schedule"]
            else f"not the reference {recipe['reference_global_batch']}"
        )
        lines += [
            "## Recipe",
            "",
            f"`config.py` sha256 `{recipe['config_sha256']}`, XTuner {recipe['xtuner_version']}, "
            f"{recipe['precision']}, global batch {recipe['global_batch']} "
            f"({schedule}), "
            f"seed {recipe['seed']}. Changes from the pinned config:",
            "",
        ]
        lines += [f"- {change}" for change in recipe["deviations"]] + [""]
        lines += _sizing_lines(recipe, timing)
    if topology:
        lines += [
            "## Topology",
            "",
            f"{topology['nnodes']} node(s) x {topology['nproc_per_node']} process(es), source: {topology['source']}.",
            "",
        ]
    if verdict["problems"]:
        lines += ["## Problems (preflight refused the run)", ""]
        lines += [f"- **{p['path']}**: {p['problem']}. Fix: {p['fix']}." for p in verdict["problems"]] + [""]
    return "\n".join(lines).rstrip() + "\n"


def _from_launch(timing: dict, key: str) -> float | None:
    """A time the verdict counts from the trainer's launch, counted from the appliance's
    launch instead: the report's one clock (preflight and earlier attempts before it)."""
    before = before_the_trainer(timing)
    return None if timing.get(key) is None or before is None else before + timing[key]


def _sizing_lines(recipe: dict, timing: dict) -> list[str]:
    """The run's micro-batches, what the memory model chose for them, and every training attempt."""
    lines = []
    batches, memory = recipe.get("micro_batches"), recipe.get("memory") or {}
    if batches:
        longest = batches["longest"]
        lines += [
            f"Micro-batches ({batches['source']}: {batches['detail']}): {batches['text_tokens_per_sample']:.1f} padded "
            f"text tokens a sample, {batches['labelled_tokens_per_sample']:.1f} labelled; the heaviest, step "
            f"{longest['step']} on rank {longest['rank']}, {longest['samples']} samples padded to "
            f"{longest['text_tokens']} text tokens ({longest['positions']} positions).",
            "",
        ]
    if memory.get("sized"):
        lines += [
            f"Memory: {memory['unchecked_llm_layers']} LLM layers unchecked, "
            f"{memory.get('selective_llm_layers', 0)} keeping their MLP's matmul outputs"
            + (", NF4 dequantized" if memory["dequantize_nf4"] else "")
            + f", {memory['predicted_peak_mib']:,} MiB predicted for the heaviest micro-batch against "
            f"{memory['budget_mib']:,} MiB ({memory['memory_share']:.0%} of {memory['gpu_memory_mib']:,})"
            + (
                " (the 20B shapes' figure: an upper bound for this smaller model)."
                if memory.get("upper_bound")
                else "."
            ),
            "",
        ]
    attempts = timing.get("attempts") or []
    if len(attempts) > 1:
        lines += ["Training attempts:", ""]
        lines += [
            f"{number}. {a['started_at']} to {a['ended_at']}, {a['wall_seconds']:.1f} s: {a['termination']}"
            + (f" ({a['detail']})" if a["detail"] else "")
            for number, a in enumerate(attempts, start=1)
        ]
        fallback = recipe.get("memory_fallback") or {}
        lines += ["", f"The retry re-sized {', '.join(fallback.get('taken_back', []))}.", ""]
    return lines


def write_report(run_dir: Path, verdict: dict) -> tuple[Path, str | None]:
    """report.md, and loss.png where there is a curve to draw: the report's path, and why
    no plot was drawn (None when it was)."""
    not_plotted = plot(verdict, run_dir / "metrics.jsonl", run_dir / PLOT_NAME)
    if not_plotted is not None:
        (run_dir / PLOT_NAME).unlink(missing_ok=True)  # a redraw leaves no stale plot
    path = run_dir / REPORT_NAME
    path.write_text(markdown(verdict, not_plotted))
    return path, not_plotted


def write_junit(verdict: dict, path: Path) -> None:
    """One test case, "loss below target within max_steps", for CI systems that read JUnit XML."""
    status = verdict["status"]
    suite = ET.Element(
        "testsuite",
        name="llava-bench",
        tests="1",
        failures=str(int(status == "fail")),
        errors=str(int(status not in ("pass", "fail"))),
    )
    properties = ET.SubElement(suite, "properties")
    median = ((verdict.get("throughput") or {}).get("seconds_per_step") or {}).get("median")
    for name, value in (("status", status), ("run_id", verdict["run_id"]), ("seconds_per_step_median", median)):
        ET.SubElement(properties, "property", name=name, value="" if value is None else str(value))
    case = ET.SubElement(
        suite,
        "testcase",
        classname="llava-bench",
        name=f"loss below {verdict['criteria']['target_loss']} within {verdict['criteria']['max_steps']} steps",
    )
    if status == "fail":
        ET.SubElement(case, "failure", message=verdict["reason"])
    elif status != "pass":
        ET.SubElement(case, "error", message=verdict["reason"], type=status)
    ET.ElementTree(suite).write(path, encoding="utf-8", xml_declaration=True)
