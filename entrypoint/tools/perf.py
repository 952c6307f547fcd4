"""`llava-bench perf`: stock XTuner and the appliance's levers, back to back on the same GPUs.

Each variant is a real `llava-bench run` of the same layout with the same seed, steps
and global batch, differing only in its lever options (VARIANTS); bench/verdict/perf_compare.py
turns their verdicts into the table and the math check.
"""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import fields, replace
from pathlib import Path

from bench.core.layout import Layout
from bench.core.trainer_files import COMPARED_STEPS
from bench.recipe.levers import PERF_VARIANTS, STOCK, Levers, lever_arguments
from bench.verdict.perf_compare import PerfRow, ProjectorComparison, compare, compare_projectors, write_perf_report


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
    **{name: _stock_but(**levers) for name, levers in PERF_VARIANTS.items()},
    "default": [],
}
DEFAULT_VARIANTS = ("exact", "stock", "stock-sdpa", "default")
# Iterations an epoch of the reference run (558,128 records at global batch 1024):
# a perf layout with this many steps an epoch has the reference's LR schedule per
# step (16 warm-up steps, then cosine), so the projector moves as it does there.
REFERENCE_STEPS_PER_EPOCH = 545
# Beside each variant's runs: the command that made them, to tell whether one can be reused.
COMMAND_FILE = "perf-command.json"


def in_fresh_process(function, *args):
    """Run GPU work in a spawned child, so this process never holds a CUDA context
    (about 0.5 GB of the first GPU) while the measured runs need the memory."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


MATMUL_WARMUP_SECONDS = 2.0  # kernel selection, and the clocks settled under load
MATMUL_ROUNDS = 11  # timed rounds; their median is the rate


def measure_matmul_tflops(device: str) -> float:
    """This card's own matmul rate, the limit a step's FLOPs are held against: fp16
    (the recipe's compute dtype) on a GPU; fp32 on a CPU, only to try the command.
    The median of rounds after a timed warm-up, so that one burst's clocks do not set
    the limit (five such probes on one H200 read within 2 %). Run in a fresh process
    (its memory goes with it)."""
    import statistics

    import torch

    on_gpu = device == "cuda"
    size, dtype, repeats = (8192, torch.float16, 50) if on_gpu else (512, torch.float32, 5)
    left = torch.randn(size, size, device=device, dtype=dtype)
    right = torch.randn(size, size, device=device, dtype=dtype)
    synchronize = torch.cuda.synchronize if on_gpu else (lambda: None)

    def round_seconds() -> float:
        synchronize()
        started = time.perf_counter()
        for _ in range(repeats):
            left @ right
        synchronize()
        return time.perf_counter() - started

    warm_until = time.perf_counter() + (MATMUL_WARMUP_SECONDS if on_gpu else 0.0)
    while time.perf_counter() < warm_until:
        round_seconds()
    seconds = statistics.median(round_seconds() for _ in range(MATMUL_ROUNDS))
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


class PerfInvalid(Exception):
    """perf cannot run as asked (exit 2): the message says why and what to do."""


def measure(
    root: Path,
    out: Path,
    variants: list[str],
    steps: int,
    precision: str,
    per_device_batch: int,
    samples: int,
    records: int | None,
    device: str,
    console,
    caption_scale: int = 1,
    models_from: Path | None = None,
    profile: bool = False,
) -> tuple[list[PerfRow], ProjectorComparison, Path]:
    """Each variant run on the layout at ``root`` (written there first when it holds
    none: random weights of the real shapes, a GPU needed, or another such layout's
    models hard-linked), compared; perf.json written."""
    import torch

    from bench.synth.spec import REAL_SHAPE_SPEC
    from bench.synth.writer import write_real_shape_layout

    if not Layout.at(root).dataset_json.exists():
        if models_from is None and not torch.cuda.is_available():
            raise PerfInvalid(
                f"{root} holds no layout, and writing the real-shape one needs a GPU; pass --root to a layout"
            )
        if models_from is not None and not Layout.at(models_from).llm_dir.is_dir():
            raise PerfInvalid(f"--models-from {models_from} holds no model folders; pass a layout perf wrote")
        records = records or REFERENCE_STEPS_PER_EPOCH * per_device_batch * max(torch.cuda.device_count(), 1)
        spec = replace(REAL_SHAPE_SPEC, samples=samples, records=records, caption_scale=caption_scale)
        console.print(
            f"writing {samples} images and {records} records (captions x{caption_scale}) to {root}, "
            + (
                f"the models hard-linked from {models_from}"
                if models_from
                else "random weights of the real shapes (39 GB)"
            ),
            highlight=False,
        )
        in_fresh_process(write_real_shape_layout, root, spec, "cuda", models_from)
    elif records is not None or caption_scale != 1 or models_from is not None:
        raise PerfInvalid(
            f"--records, --caption-scale and --models-from apply to a layout written here; {root} already holds one"
        )
    gpus = torch.cuda.device_count() if device != "cpu" else 0
    # One micro-batch a step: the layout's record count gives the reference schedule per step.
    run_options = [
        *("--max-steps", str(steps), "--target-loss", "1e9", "--precision", precision),
        *("--per-device-batch", str(per_device_batch), "--global-batch", str(per_device_batch * max(gpus, 1))),
        *("--device", device, "--save-projector"),
        *(["--profile"] if profile else []),
    ]
    out.mkdir(parents=True, exist_ok=True)
    matmul_device = "cuda" if device != "cpu" and torch.cuda.is_available() else "cpu"
    matmul_tflops = in_fresh_process(measure_matmul_tflops, matmul_device)
    console.print(
        f"matmul on this {matmul_device}: {matmul_tflops:.3g} TFLOP/s measured (the limit below)", highlight=False
    )
    verdicts = {name: run_variant(name, root, out, run_options) for name in variants}
    projectors = compare_projectors(verdicts)
    rows = compare(verdicts, matmul_tflops, projectors)
    return rows, projectors, write_perf_report(out, rows, run_options, matmul_tflops, projectors)
