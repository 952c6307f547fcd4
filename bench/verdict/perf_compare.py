"""What `llava-bench perf` concludes from its variants' verdicts: one row per variant
against stock (speed, memory, start-up, the matmul limit) and the math check, each
variant's projector held against a reference run's.

The math check: the projector (the only trained module) is compared with a reference
run's by its gradient in the first backward pass (same weights, same batch) and its
weights after COMPARED_STEPS AdamW steps. The reference is the float32 run (`exact`)
where it ran, and a variant agrees when it is no farther from it than stock's own
half-precision rounding allows (stock-sdpa's where stock did not run); without it, the
reference is stock and the allowance a second stock run's difference. A lever that
broke the gradient, down to one that zeroed it, is far outside either.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.core.trainer_files import COMPARED_STEPS, PROFILE_NAME, PROFILE_TRACE_NAME, PROJECTOR_SNAPSHOTS
from bench.verdict.idle_gaps import idle_gaps

# The reference runs, in order of preference, and whose difference from each is the
# rounding a variant is allowed (the first of them that ran): against exact, stock's
# (its half precision), else stock as the pinned commit runs it (SDPA attention, another
# half-precision rounding of the same function); against stock, a second stock run's.
ALLOWANCE_FROM = {"exact": ("stock", "stock-sdpa"), "stock": ("stock-again",)}

# A variant did the reference's math when its projector (first gradient, weights after
# the compared steps) is within this many times stock's own difference from the
# reference (another half-precision rounding of the same function may land farther
# than stock's did; one sample only estimates its size)...
PROJECTOR_NOISE_FACTOR = 2.0

# ...or within this share of it, which rounding alone stays under where stock's own
# difference is nil (a deterministic stock against itself, or on CPU, where stock is
# float32): a lever that sums in another order moves a gradient by a few tenths of a
# percent; one that broke the gradient is at 100 % (docs/PERFORMANCE.md).
GRADIENT_ROUNDING = 0.02


@dataclass(frozen=True)
class PerfRow:
    variant: str
    termination: str  # completed, crashed, ...: the run must complete for its figures to count
    seconds_per_step: float | None  # median over the steady window
    data_time_share: float | None
    peak_memory_mib: float | None
    mfu: float | None
    preflight_seconds: float | None  # the appliance's start to the trainer's launch
    startup_seconds: float | None  # the trainer's launch to the first step
    launch_to_first_step_seconds: float | None  # their sum
    startup: dict | None  # where that time went (the verdict's timing.startup)
    ratio_vs_stock: float | None  # seconds per step / stock's
    ratio_vs_stock_sdpa: float | None  # seconds per step / stock-sdpa's: stock as the pinned commit runs it
    max_loss_difference: float | None  # over the steps both logged, vs stock
    limit_seconds_per_step: float | None  # model FLOPs per device / the measured matmul rate
    times_limit: float | None  # seconds per step / that limit
    gradient_difference: float | None  # |first projector gradient - the reference's| / |the reference's|
    gradient_agrees: bool | None  # the math check on it (agrees); None without the snapshots
    projector_distance: float | None  # |projector after the compared steps - the reference's| / the reference's move
    projector_agrees: bool | None  # the math check on it
    llm_architecture: str | None  # InternLM2ForCausalLM, or the stand-in's
    levers: dict | None
    run_dir: str
    profile: dict | None = None  # `run --profile`'s kernel time by kind (bench/trainer/step_profile.py)


def _losses(verdict: dict) -> dict[int, float]:
    curve = (verdict.get("result") or {}).get("curve", [])
    return {point["iter"]: point["loss"] for point in curve if point["loss"] is not None}


def _projector(verdict: dict, snapshot: str):
    """One projector snapshot of a run as a flat float64 vector, or None if it has none."""
    import torch
    from safetensors.torch import load_file

    path = Path(verdict.get("_run_dir", "")) / "xtuner" / snapshot
    if not path.is_file():
        return None
    tensors = load_file(str(path))
    return torch.cat([tensors[name].double().flatten() for name in sorted(tensors)])


@dataclass(frozen=True)
class ProjectorComparison:
    """Each variant's projector against the reference run's (variants that saved theirs)."""

    reference: str | None  # "exact" where it ran, else "stock"; None: neither saved its projector
    allowance_from: str | None  # whose difference from the reference is the rounding allowed (ALLOWANCE_FROM)
    gradient_differences: dict[str, float]  # |first gradient - the reference's| / |the reference's|
    distances: dict[str, float]  # |weights after the compared steps - the reference's| / the reference's move
    movement: float | None  # the reference's move over the compared steps / its initial norm: the LR moved it

    def agrees(self, variant: str) -> tuple[bool | None, bool | None]:
        """Whether the first gradient and the weights after the compared steps are the
        reference's; not judged against exact without stock's own difference to allow."""
        if self.reference == "exact" and self.allowance_from is None:
            return None, None
        return tuple(
            agrees(values.get(variant), values.get(self.allowance_from) if self.allowance_from else None)
            for values in (self.gradient_differences, self.distances)
        )


def compare_projectors(verdicts: dict[str, dict]) -> ProjectorComparison:
    """Each variant's first projector gradient and its weights after the compared steps,
    against the reference run's: exact where it saved them, else stock."""
    first_gradient = PROJECTOR_SNAPSHOTS["first_gradient"]
    saved = [name for name in ALLOWANCE_FROM if _projector(verdicts.get(name) or {}, first_gradient) is not None]
    if not saved:
        return ProjectorComparison(None, None, {}, {}, None)
    reference = saved[0]
    allowance_from = next((name for name in ALLOWANCE_FROM[reference] if name in verdicts), None)
    own = {key: _projector(verdicts[reference], name) for key, name in PROJECTOR_SNAPSHOTS.items()}
    gradient, start, compared = own["first_gradient"], own["before_train"], own["after_compared_steps"]
    differences, distances, movement = {}, {}, None
    for variant, verdict in verdicts.items():
        first = _projector(verdict, first_gradient)
        if first is not None and float(gradient.norm()) > 0:
            differences[variant] = float((first - gradient).norm() / gradient.norm())
    if start is not None and compared is not None and float((compared - start).norm()) > 0:
        move = float((compared - start).norm())
        movement = move / float(start.norm())
        for variant, verdict in verdicts.items():
            weights = _projector(verdict, PROJECTOR_SNAPSHOTS["after_compared_steps"])
            if weights is not None:
                distances[variant] = float((weights - compared).norm()) / move
    return ProjectorComparison(reference, allowance_from, differences, distances, movement)


def agrees(difference: float | None, allowance: float | None) -> bool | None:
    """Whether a variant's projector is the reference's: within PROJECTOR_NOISE_FACTOR
    times stock's own difference (``allowance``) or GRADIENT_ROUNDING, whichever is
    larger. None when the variant saved none, or when that bound reaches 1, the
    distance of a zeroed gradient or an untrained projector: stock's own rounding is
    then too large for the check to tell a broken lever from a sound one."""
    bound = max(PROJECTOR_NOISE_FACTOR * (allowance or 0.0), GRADIENT_ROUNDING)
    if difference is None or bound >= 1:
        return None
    return difference <= bound


def _profile(verdict: dict) -> dict | None:
    """The run's step profile, with its trace's idle gaps attributed where the trace was kept."""
    folder = Path(verdict.get("_run_dir", "")) / "xtuner"
    if not (folder / PROFILE_NAME).is_file():
        return None
    profile = json.loads((folder / PROFILE_NAME).read_text())
    if (folder / PROFILE_TRACE_NAME).is_file():
        with gzip.open(folder / PROFILE_TRACE_NAME, "rt") as trace:
            profile["idle_gaps"] = idle_gaps(json.load(trace)["traceEvents"])
    return profile


def _seconds_per_step(verdict: dict | None) -> float | None:
    """The median over the steady window; None for a variant that did not run or measure one."""
    return (((verdict or {}).get("throughput") or {}).get("seconds_per_step") or {}).get("median")


def compare(verdicts: dict[str, dict], matmul_tflops: float | None, projectors: ProjectorComparison) -> list[PerfRow]:
    """One row per variant, against the stock variant when there is one, against the
    matmul limit when the step's FLOPs are known, and, for the projector, against the
    reference run's (``projectors`` from compare_projectors)."""
    stock = verdicts.get("stock")
    stock_speed, stock_sdpa_speed = (_seconds_per_step(verdicts.get(name)) for name in ("stock", "stock-sdpa"))
    stock_losses = _losses(stock) if stock else {}
    rows = []
    for variant, verdict in verdicts.items():
        throughput = verdict.get("throughput") or {}
        timing = verdict.get("timing") or {}
        speed = _seconds_per_step(verdict)
        losses = _losses(verdict)
        common = sorted(set(losses) & set(stock_losses))
        flops = throughput.get("flops_per_step")
        limit = flops / verdict["world_size"] / (matmul_tflops * 1e12) if flops and matmul_tflops else None
        gradient_agrees, projector_agrees = projectors.agrees(variant)
        rows.append(
            PerfRow(
                variant=variant,
                termination=verdict["termination"]["kind"],
                seconds_per_step=speed,
                data_time_share=throughput.get("data_time_share"),
                peak_memory_mib=throughput.get("peak_memory_mib"),
                mfu=throughput.get("mfu"),
                preflight_seconds=timing.get("preflight_seconds"),
                startup_seconds=timing.get("startup_seconds"),
                launch_to_first_step_seconds=timing.get("launch_to_first_step_seconds"),
                startup=timing.get("startup"),
                ratio_vs_stock=speed / stock_speed if speed and stock_speed else None,
                ratio_vs_stock_sdpa=speed / stock_sdpa_speed if speed and stock_sdpa_speed else None,
                max_loss_difference=max((abs(losses[s] - stock_losses[s]) for s in common), default=None),
                limit_seconds_per_step=limit,
                times_limit=speed / limit if speed and limit else None,
                gradient_difference=projectors.gradient_differences.get(variant),
                gradient_agrees=gradient_agrees,
                projector_distance=projectors.distances.get(variant),
                projector_agrees=projector_agrees,
                llm_architecture=next(
                    iter(((verdict.get("inputs") or {}).get("llm") or {}).get("architectures") or []), None
                ),
                levers=(verdict.get("recipe") or {}).get("levers"),
                run_dir=verdict.get("_run_dir", ""),
                profile=_profile(verdict),
            )
        )
    return rows


def table(rows: list[PerfRow]) -> str:
    """Plain text, one line per variant (also what docs/PERFORMANCE.md quotes)."""

    def cell(value, form):  # form like "7.3f": its width holds "-" too
        return format("-", f">{form.split('.')[0]}") if value is None else format(value, form)

    lines = [
        "variant     run        s/step  x stock  x stock-sdpa  data  peak MiB   MFU  pre s  start s  max |dloss|"
        "  x limit  grad diff  agrees  proj dist  agrees"
    ]
    word = {None: "-", True: "yes", False: "NO"}  # -: not measured, or the allowance cannot tell
    for row in rows:
        lines.append(
            f"{row.variant:<11} {row.termination:<9} {cell(row.seconds_per_step, '7.3f')} "
            f"{cell(row.ratio_vs_stock, '8.3f')} {cell(row.ratio_vs_stock_sdpa, '13.3f')}"
            f" {cell(row.data_time_share, '5.1%')} {cell(row.peak_memory_mib, '9.0f')} {cell(row.mfu, '5.3f')}"
            f" {cell(row.preflight_seconds, '6.1f')} {cell(row.startup_seconds, '8.1f')}"
            f" {cell(row.max_loss_difference, '12.2e')} {cell(row.times_limit, '8.2f')}"
            f" {cell(row.gradient_difference, '10.2e')} {word[row.gradient_agrees]:>7}"
            f" {cell(row.projector_distance, '10.2e')} {word[row.projector_agrees]:>7}"
        )
    lines.append(noise_line(rows))
    architectures = {row.llm_architecture for row in rows} - {"InternLM2ForCausalLM"}
    if architectures:
        lines.append(f"(the LLM is a stand-in: {', '.join(sorted(map(str, architectures)))}, not InternLM2's own code)")
    profiled = profile_table(rows)
    return "\n".join([*lines, "", startup_table(rows), *(["", profiled] if profiled else [])])


def noise_line(rows: list[PerfRow]) -> str:
    """What a ratio to stock can be read to: stock run twice (stock-again) measures the
    run-to-run noise; without it the reader is told the ratios stand on one run each."""
    again = next((row.ratio_vs_stock for row in rows if row.variant == "stock-again"), None)
    if again is None:
        return (
            "x stock: one run a variant, run-to-run noise not measured (add --variant stock-again): a ratio near 1 "
            "may be noise"
        )
    noise = abs(again - 1)
    within = [row.variant for row in rows if row.ratio_vs_stock is not None and abs(row.ratio_vs_stock - 1) <= noise]
    return (
        f"x stock: stock run again took {again:.3f} x stock's time, so ratios within {noise:.1%} of 1 are run-to-run "
        f"noise ({', '.join(within)})"
    )


# The start-up table's columns: (heading, width, the figure from timing.startup).
STARTUP_COLUMNS = (
    ("imports", 7, lambda s: s.get("imports_seconds")),
    ("checks", 6, lambda s: s.get("checks_seconds")),
    ("interconnect", 12, lambda s: s.get("interconnect_seconds")),
    ("early imports", 13, lambda s: (s.get("early_start") or {}).get("imports_seconds")),
    ("tok build", 9, lambda s: (s.get("tokenization") or {}).get("build_seconds")),
    ("tok wait", 8, lambda s: (s.get("tokenization") or {}).get("wait_seconds")),
    ("runner", 6, lambda s: (s.get("trainer") or {}).get("runner_seconds")),
    ("dataset", 7, lambda s: (s.get("trainer") or {}).get("dataset_seconds")),
    ("model", 6, lambda s: (s.get("trainer") or {}).get("model_seconds")),
    ("deepspeed", 9, lambda s: (s.get("trainer") or {}).get("deepspeed_seconds")),
    ("1st step", 8, lambda s: (s.get("trainer") or {}).get("first_step_seconds")),
)


def startup_table(rows: list[PerfRow]) -> str:
    """Where each variant's time before its first step went, in seconds (docs/VERDICT.md's
    timing.startup); tokens says whether the tokenized dataset was a cache, built or left to XTuner."""
    headings = "  ".join(f"{name:>{width}}" for name, width, _ in STARTUP_COLUMNS)
    lines = [f"start-up s  tokens  {headings}  to 1st step"]
    for row in rows:
        startup = row.startup or {}
        source = (startup.get("tokenization") or {}).get("source", "xtuner")
        figures = "  ".join(
            "-".rjust(width) if figure(startup) is None else f"{figure(startup):{width}.1f}"
            for _, width, figure in STARTUP_COLUMNS
        )
        total = row.launch_to_first_step_seconds
        lines.append(
            f"{row.variant:<10}  {source:<6}  {figures}  {'-'.rjust(11) if total is None else f'{total:11.1f}'}"
        )
    return "\n".join(lines)


def write_perf_report(
    out: Path, rows: list[PerfRow], run_options: list[str], matmul_tflops: float | None, projectors: ProjectorComparison
) -> Path:
    path = out / "perf.json"
    document = {
        "run_options": run_options,
        "matmul_tflops_per_device": matmul_tflops,
        "compared_steps": COMPARED_STEPS,
        "projector_reference": projectors.reference,
        "projector_allowance_from": projectors.allowance_from,
        "projector_movement": projectors.movement,  # the reference's move over the compared steps / its initial norm
        "rows": [asdict(row) for row in rows],
    }
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path


def profile_table(rows: list[PerfRow]) -> str | None:
    """Each profiled variant's step: the share of its wall time each kind of GPU work
    took, the recompute's share (kernels of every kind) and the GPU's idle share."""
    profiled = [row for row in rows if row.profile]
    if not profiled:
        return None
    kinds = list(profiled[0].profile["by_kind_seconds"])
    lines = [
        "profile, share of the steps' wall time: "
        + ", ".join(f"{chr(ord('a') + i)} {kind}" for i, kind in enumerate(kinds))
        + "; recompute: the checkpointed layers' recompute, of any kind",
        f"{'variant':<11} steps  wall s  "
        + "  ".join(f"{chr(ord('a') + i):>5}" for i in range(len(kinds)))
        + "  recompute   idle",
    ]
    for row in profiled:
        profile = row.profile
        wall = profile["wall_seconds"]
        shares = "  ".join(f"{profile['by_kind_seconds'].get(kind, 0.0) / wall:5.1%}" for kind in kinds)
        steps = "-".join(map(str, profile["iterations"]))
        lines.append(
            f"{row.variant:<11} {steps:<5} {wall:7.2f}  {shares}  {profile['recompute_seconds'] / wall:9.1%}"
            f"  {profile['idle_seconds'] / wall:5.1%}"
        )
    for row in profiled:
        if gaps := row.profile.get("idle_gaps"):
            lines.append(
                f"{row.variant} idle: {gaps['gap_seconds']:.2f} s between kernels, {gaps['synchronizations']} "
                "synchronizations; the most before kernels launched in: "
                + "; ".join(f"{charge['ops']} ({charge['seconds']:.3f} s)" for charge in gaps["by_launching_ops"][:3])
            )
    return "\n".join(lines)
