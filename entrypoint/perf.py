"""`llava-bench perf`: stock XTuner and the appliance's levers, back to back on the same GPUs.

Each variant is a real `llava-bench run` of the same layout with the same seed, steps
and global batch, differing only in its lever options; the table compares time per
step, data share, peak memory, MFU and start-up with the stock run, and whether each
variant did the same math. That check holds the projector (the only trained module)
against a reference: its gradient in the first backward pass (same weights, same
batch) and its weights after COMPARED_STEPS AdamW steps. The reference is the
float32 run (`exact`) where it ran, and a variant agrees when it is no farther from it
than stock's own half-precision rounding allows; without it, the reference is stock
and the allowance a second stock run's difference. A lever that broke the gradient,
down to one that zeroed it, is far outside either. Also shown: the loss curve against
stock's.
"""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from bench.levers import APPLIANCE_DATALOADER_WORKERS, STOCK, Levers, lever_arguments
from bench.trainer import COMPARED_STEPS, PROJECTOR_SNAPSHOTS


def _stock_but(**on) -> list[str]:
    """`llava-bench run` options of every lever at its stock value but those in ``on``
    (None: `run`'s own default on this machine, for a lever whose value depends on the
    GPUs' memory). Each single-lever variant is stock with one lever on, so its own
    effect is measured."""
    arguments = []
    for lever in fields(Levers):
        value = on.get(lever.name, getattr(STOCK, lever.name))
        if value is not None:
            arguments += lever_arguments(lever.name, value)
    return arguments


# Variant name -> `llava-bench run` options.
VARIANTS = {
    # The math reference: stock in float32, for the compared steps only (the last
    # --max-steps given wins), as float32 is the slowest run by far on GPUs.
    "exact": ["--float32-reference", "--max-steps", str(COMPARED_STEPS)],
    "stock": ["--stock"],
    "stock-again": ["--stock"],  # stock's run-to-run noise: the allowance where exact did not run
    "workers": _stock_but(dataloader_workers=APPLIANCE_DATALOADER_WORKERS, pin_memory=True),
    "dequantize": _stock_but(dequantize_nf4=True),
    "tokenized-cache": _stock_but(tokenized_cache=True),
    "vit": _stock_but(skip_vit_backward=True),
    "unchecked": _stock_but(unchecked_llm_layers=None),
    "logits": _stock_but(labelled_logits_only=True),
    "sdpa": _stock_but(sdpa_attention=True),
    "default": [],
}
DEFAULT_VARIANTS = ("exact", "stock", "default")
# The reference runs, in order of preference, and whose difference from each is the
# rounding a variant is allowed: against exact, stock's (its half precision); against
# stock, a second stock run's.
ALLOWANCE_FROM = {"exact": "stock", "stock": "stock-again"}
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
# Iterations an epoch of the reference run (558,128 records at global batch 1024):
# a perf layout with this many steps an epoch has the reference's LR schedule per
# step (16 warm-up steps, then cosine), so the projector moves as it does there.
REFERENCE_STEPS_PER_EPOCH = 545
# Beside each variant's runs: the command that made them, to tell whether one can be reused.
COMMAND_FILE = "perf-command.json"


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
    ratio_vs_stock: float | None  # seconds per step / stock's
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


def in_fresh_process(function, *args):
    """Run GPU work in a spawned child, so this process never holds a CUDA context
    (about 0.5 GB of the first GPU) while the measured runs need the memory."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def measure_matmul_tflops(device: str) -> float:
    """This card's own matmul rate, the limit a step's FLOPs are held against: fp16
    (the recipe's compute dtype) on a GPU; fp32 on a CPU, only to try the command."""
    import torch

    on_gpu = device == "cuda"
    size, dtype, repeats = (8192, torch.float16, 50) if on_gpu else (512, torch.float32, 5)
    left = torch.randn(size, size, device=device, dtype=dtype)
    right = torch.randn(size, size, device=device, dtype=dtype)
    synchronize = torch.cuda.synchronize if on_gpu else (lambda: None)
    for _ in range(3):  # kernel selection and clocks
        left @ right
    synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        left @ right
    synchronize()
    seconds = time.perf_counter() - started
    del left, right
    if on_gpu:
        torch.cuda.empty_cache()
    return 2 * size**3 * repeats / seconds / 1e12


def run_variant(variant: str, root: Path, out: Path, run_options: list[str]) -> dict:
    """One real run; its verdict. The run's own progress goes to stderr, so stdout
    carries only the table (or --json). A completed run of this variant with the same
    layout and options already under ``out`` is reused, so an interrupted
    comparison resumes where it stopped."""
    folder = out / variant
    command = [
        sys.executable,
        "-m",
        "entrypoint",
        "run",
        "--root",
        str(root),
        "--out",
        str(folder),
        *run_options,
        *VARIANTS[variant],
    ]
    previous = _completed_verdict(folder, command)
    if previous is not None:
        print(f"{variant}: reusing {previous['_run_dir']}", file=sys.stderr)
        return previous
    folder.mkdir(parents=True, exist_ok=True)
    (folder / COMMAND_FILE).write_text(json.dumps(command[1:]) + "\n")
    subprocess.run(command, stdout=sys.stderr.fileno(), check=False)
    verdict = _latest_verdict(folder)
    if verdict is None:
        raise RuntimeError(f"variant {variant}: no verdict written under {folder}; see the output above")
    return verdict


def _latest_verdict(folder: Path) -> dict | None:
    run_dirs = sorted(p for p in folder.iterdir() if (p / "verdict.json").is_file()) if folder.is_dir() else []
    if not run_dirs:
        return None
    verdict = json.loads((run_dirs[-1] / "verdict.json").read_text())
    verdict["_run_dir"] = str(run_dirs[-1])
    return verdict


def _completed_verdict(folder: Path, command: list[str]) -> dict | None:
    recorded = folder / COMMAND_FILE
    if not recorded.is_file() or json.loads(recorded.read_text()) != command[1:]:
        return None
    verdict = _latest_verdict(folder)
    return verdict if verdict is not None and verdict["termination"]["kind"] == "completed" else None


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
    allowance_from: str | None  # whose difference from the reference is the rounding allowed: stock's or stock-again's
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
    allowance_from = ALLOWANCE_FROM[reference] if ALLOWANCE_FROM[reference] in verdicts else None
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


def compare(verdicts: dict[str, dict], matmul_tflops: float | None, projectors: ProjectorComparison) -> list[PerfRow]:
    """One row per variant, against the stock variant when there is one, against the
    matmul limit when the step's FLOPs are known, and, for the projector, against the
    reference run's (``projectors`` from compare_projectors)."""
    stock = verdicts.get("stock")
    stock_speed = ((stock or {}).get("throughput") or {}).get("seconds_per_step", {}).get("median")
    stock_losses = _losses(stock) if stock else {}
    rows = []
    for variant, verdict in verdicts.items():
        throughput = verdict.get("throughput") or {}
        timing = verdict.get("timing") or {}
        speed = (throughput.get("seconds_per_step") or {}).get("median")
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
                ratio_vs_stock=speed / stock_speed if speed and stock_speed else None,
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
            )
        )
    return rows


def table(rows: list[PerfRow]) -> str:
    """Plain text, one line per variant (also what docs/PERFORMANCE.md quotes)."""

    def cell(value, form):  # form like "7.3f": its width holds "-" too
        return format("-", f">{form.split('.')[0]}") if value is None else format(value, form)

    lines = [
        "variant     run        s/step  x stock  data  peak MiB   MFU  pre s  start s  max |dloss|  x limit"
        "  grad diff  agrees  proj dist  agrees"
    ]
    word = {None: "-", True: "yes", False: "NO"}  # -: not measured, or the allowance cannot tell
    for row in rows:
        lines.append(
            f"{row.variant:<11} {row.termination:<9} {cell(row.seconds_per_step, '7.3f')} "
            f"{cell(row.ratio_vs_stock, '8.3f')}"
            f" {cell(row.data_time_share, '5.1%')} {cell(row.peak_memory_mib, '9.0f')} {cell(row.mfu, '5.3f')}"
            f" {cell(row.preflight_seconds, '6.1f')} {cell(row.startup_seconds, '8.1f')}"
            f" {cell(row.max_loss_difference, '12.2e')} {cell(row.times_limit, '8.2f')}"
            f" {cell(row.gradient_difference, '10.2e')} {word[row.gradient_agrees]:>7}"
            f" {cell(row.projector_distance, '10.2e')} {word[row.projector_agrees]:>7}"
        )
    architectures = {row.llm_architecture for row in rows} - {"InternLM2ForCausalLM"}
    if architectures:
        lines.append(f"(the LLM is a stand-in: {', '.join(sorted(map(str, architectures)))}, not InternLM2's own code)")
    return "\n".join(lines)


def write_report(
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
