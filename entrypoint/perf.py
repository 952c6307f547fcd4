"""`llava-bench perf`: stock XTuner and the appliance's levers, back to back on the same GPUs.

Each variant is a real `llava-bench run` of the same layout with the same seed, steps
and global batch, differing only in its lever options; the table compares time per
step, data share, peak memory, MFU and start-up with the stock run, and whether each
variant did the same math: the projector (the only trained module) gets the same
gradient in the first backward pass as stock's, to rounding (a lever that broke it,
down to one that zeroed it, is far outside). Also shown: the loss curve against
stock's, and the projector after the last step against stock's, held against a
second stock run's difference (in bf16 rounding differences grow over AdamW steps).
"""
from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.trainer import PROJECTOR_SNAPSHOTS

# Variant name -> `llava-bench run` lever options. Each single-lever variant is stock
# with one lever switched on, so its own effect is measured.
_ALL_OFF = {
    "dataloader_workers": ["--dataloader-workers", "0", "--no-pin-memory"],
    "dequantize_nf4": ["--no-dequantize-nf4"],
    "tokenized_cache": ["--no-tokenized-cache"],
    "skip_vit_backward": ["--no-skip-vit-backward"],
    "unchecked_llm_layers": ["--unchecked-llm-layers", "0"],
    "labelled_logits_only": ["--no-labelled-logits-only"],
    "sdpa_attention": ["--no-sdpa-attention"],
}


def _only(lever: str, *on: str) -> list[str]:
    """Stock but for ``lever``, which gets the options ``on`` (none: `run`'s default
    for this machine, for a lever whose value depends on the GPUs' memory)."""
    return [part for name, off in _ALL_OFF.items() for part in (on if name == lever else off)]


VARIANTS = {
    "stock": ["--stock"],
    "stock-again": ["--stock"],  # stock's run-to-run noise, which the others are held against
    "workers": _only("dataloader_workers", "--dataloader-workers", "4", "--pin-memory"),
    "dequantize": _only("dequantize_nf4", "--dequantize-nf4"),
    "tokenized-cache": _only("tokenized_cache", "--tokenized-cache"),
    "vit": _only("skip_vit_backward", "--skip-vit-backward"),
    "unchecked": _only("unchecked_llm_layers"),
    "logits": _only("labelled_logits_only", "--labelled-logits-only"),
    "sdpa": _only("sdpa_attention", "--sdpa-attention"),
    "default": [],
}
DEFAULT_VARIANTS = ("stock", "stock-again", "default")
# A variant did stock's math when its first projector gradient (same weights, same
# batch) is within this many times the second stock run's difference from stock's
# (both runs differ from stock by run-to-run noise, whose size one sample only
# estimates)...
PROJECTOR_NOISE_FACTOR = 2.0
# ...or within this share of it, which rounding alone stays under: the recipe trains
# in bf16 (8 significant bits, up to 0.2 % a rounding), and a lever that sums in
# another order moves a gradient through 48 layers by a few tenths of a percent;
# a lever that broke the gradient is at 100 % (docs/PERFORMANCE.md).
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
    gradient_difference: float | None  # |first projector gradient - stock's| / |stock's|
    gradient_agrees: bool | None  # the math check (gradient_agrees); None without the snapshots
    projector_distance: float | None  # |final projector - stock's| / |stock's final - its start|
    projector_vs_noise: float | None  # that distance / the second stock run's
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
    command = [sys.executable, "-m", "entrypoint", "run", "--root", str(root), "--out", str(folder), *run_options, *VARIANTS[variant]]
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
    """Each variant's projector against stock's (only variants that saved theirs)."""

    gradient_differences: dict[str, float]  # |first gradient - stock's| / |stock's|
    distances: dict[str, float]  # |final weights - stock's| / |stock's final - its start|
    movement: float | None  # |stock's final - its start| / |its start|: the LR moved it


def compare_projectors(verdicts: dict[str, dict]) -> ProjectorComparison:
    """Each variant's first projector gradient and final projector against stock's."""
    stock = verdicts.get("stock") or {}
    snapshots = {key: _projector(stock, name) for key, name in PROJECTOR_SNAPSHOTS.items()}
    gradient, start, final = snapshots["first_gradient"], snapshots["before_train"], snapshots["after_train"]
    differences, distances, movement = {}, {}, None
    for variant, verdict in verdicts.items():
        own = _projector(verdict, PROJECTOR_SNAPSHOTS["first_gradient"])
        if own is not None and gradient is not None and float(gradient.norm()) > 0:
            differences[variant] = float((own - gradient).norm() / gradient.norm())
    if start is not None and final is not None and float((final - start).norm()) > 0:
        move = float((final - start).norm())
        movement = move / float(start.norm())
        for variant, verdict in verdicts.items():
            weights = _projector(verdict, PROJECTOR_SNAPSHOTS["after_train"])
            if weights is not None:
                distances[variant] = float((weights - final).norm()) / move
    return ProjectorComparison(differences, distances, movement)


def gradient_agrees(difference: float | None, noise: float | None) -> bool | None:
    """Whether a variant's first projector gradient is stock's: within twice the second
    stock run's difference or GRADIENT_ROUNDING, whichever is larger; None when either
    run saved none."""
    if difference is None:
        return None
    return difference <= max(PROJECTOR_NOISE_FACTOR * (noise or 0.0), GRADIENT_ROUNDING)


def compare(verdicts: dict[str, dict], matmul_tflops: float | None, projectors: ProjectorComparison) -> list[PerfRow]:
    """One row per variant, against the stock variant when there is one, against the
    matmul limit when the step's FLOPs are known, and, for the projector, against
    stock's and the second stock run's (``projectors`` from compare_projectors)."""
    distance_noise = projectors.distances.get("stock-again")
    gradient_noise = projectors.gradient_differences.get("stock-again")
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
                gradient_agrees=gradient_agrees(projectors.gradient_differences.get(variant), gradient_noise),
                projector_distance=projectors.distances.get(variant),
                projector_vs_noise=_ratio(projectors.distances.get(variant), distance_noise),
                llm_architecture=next(iter(((verdict.get("inputs") or {}).get("llm") or {}).get("architectures") or []), None),
                levers=(verdict.get("recipe") or {}).get("levers"),
                run_dir=verdict.get("_run_dir", ""),
            )
        )
    return rows


def _ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or not reference:
        return None
    return value / reference


def table(rows: list[PerfRow]) -> str:
    """Plain text, one line per variant (also what docs/PERFORMANCE.md quotes)."""

    def cell(value, form):  # form like "7.3f": its width holds "-" too
        return format("-", f">{form.split('.')[0]}") if value is None else format(value, form)

    lines = [
        "variant     run        s/step  x stock  data  peak MiB   MFU  pre s  start s  max |dloss|  x limit"
        "  grad diff  agrees  proj dist  x noise"
    ]
    for row in rows:
        agrees = {None: "-", True: "yes", False: "NO"}[row.gradient_agrees]
        lines.append(
            f"{row.variant:<11} {row.termination:<9} {cell(row.seconds_per_step, '7.3f')} {cell(row.ratio_vs_stock, '8.3f')}"
            f" {cell(row.data_time_share, '5.1%')} {cell(row.peak_memory_mib, '9.0f')} {cell(row.mfu, '5.3f')}"
            f" {cell(row.preflight_seconds, '6.1f')} {cell(row.startup_seconds, '8.1f')}"
            f" {cell(row.max_loss_difference, '12.2e')} {cell(row.times_limit, '8.2f')}"
            f" {cell(row.gradient_difference, '10.2e')} {agrees:>7} {cell(row.projector_distance, '10.2e')}"
            f" {cell(row.projector_vs_noise, '8.2f')}"
        )
    architectures = {row.llm_architecture for row in rows} - {"InternLM2ForCausalLM"}
    if architectures:
        lines.append(f"(the LLM is a stand-in: {', '.join(sorted(map(str, architectures)))}, not InternLM2's own code)")
    return "\n".join(lines)


def write_report(
    out: Path, rows: list[PerfRow], run_options: list[str], matmul_tflops: float | None, projector_movement: float | None
) -> Path:
    path = out / "perf.json"
    document = {
        "run_options": run_options,
        "matmul_tflops_per_device": matmul_tflops,
        "projector_movement": projector_movement,  # |stock's final projector - its start| / |its start|
        "rows": [asdict(row) for row in rows],
    }
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path
