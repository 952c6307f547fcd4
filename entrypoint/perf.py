"""`llava-bench perf`: stock XTuner and the appliance's levers, back to back on the same GPUs.

Each variant is a real `llava-bench run` of the same layout with the same seed, steps
and global batch, differing only in its lever options; the table compares time per
step, data share, peak memory, MFU and start-up with the stock run, and how far each
loss curve departs from stock's (the levers must not change the math).
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

# Variant name -> `llava-bench run` lever options. Each single-lever variant is stock
# with one lever switched on, so its own effect is measured.
_ALL_OFF = {
    "dataloader_workers": ["--dataloader-workers", "0", "--no-pin-memory"],
    "dequantize_nf4": ["--no-dequantize-nf4"],
    "tokenized_cache": ["--no-tokenized-cache"],
    "skip_vit_backward": ["--no-skip-vit-backward"],
    "unchecked_llm_layers": ["--unchecked-llm-layers", "0"],
    "labelled_logits_only": ["--no-labelled-logits-only"],
}


def _only(lever: str, *on: str) -> list[str]:
    """Stock but for ``lever``, which gets the options ``on`` (none: `run`'s default
    for this machine, for a lever whose value depends on the GPUs' memory)."""
    return [part for name, off in _ALL_OFF.items() for part in (on if name == lever else off)]


VARIANTS = {
    "stock": ["--stock"],
    "workers": _only("dataloader_workers", "--dataloader-workers", "4", "--pin-memory"),
    "dequantize": _only("dequantize_nf4", "--dequantize-nf4"),
    "tokenized-cache": _only("tokenized_cache", "--tokenized-cache"),
    "vit": _only("skip_vit_backward", "--skip-vit-backward"),
    "unchecked": _only("unchecked_llm_layers"),
    "logits": _only("labelled_logits_only", "--labelled-logits-only"),
    "default": [],
}
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
    return {point["step"]: point["loss"] for point in curve if point["loss"] is not None}


def compare(verdicts: dict[str, dict], matmul_tflops: float | None) -> list[PerfRow]:
    """One row per variant, against the stock variant when there is one and against
    the matmul limit when the step's FLOPs are known."""
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
                levers=(verdict.get("recipe") or {}).get("levers"),
                run_dir=verdict.get("_run_dir", ""),
            )
        )
    return rows


def table(rows: list[PerfRow]) -> str:
    """Plain text, one line per variant (also what docs/PERFORMANCE.md quotes)."""

    def cell(value, form):  # form like "7.3f": its width holds "-" too
        return format("-", f">{form.split('.')[0]}") if value is None else format(value, form)

    lines = ["variant     run        s/step  x stock  data  peak MiB   MFU  pre s  start s  max |dloss|  x limit"]
    for row in rows:
        lines.append(
            f"{row.variant:<11} {row.termination:<9} {cell(row.seconds_per_step, '7.3f')} {cell(row.ratio_vs_stock, '8.3f')}"
            f" {cell(row.data_time_share, '5.1%')} {cell(row.peak_memory_mib, '9.0f')} {cell(row.mfu, '5.3f')}"
            f" {cell(row.preflight_seconds, '6.1f')} {cell(row.startup_seconds, '8.1f')}"
            f" {cell(row.max_loss_difference, '12.2e')} {cell(row.times_limit, '8.2f')}"
        )
    return "\n".join(lines)


def write_report(out: Path, rows: list[PerfRow], run_options: list[str], matmul_tflops: float | None) -> Path:
    path = out / "perf.json"
    document = {"run_options": run_options, "matmul_tflops_per_device": matmul_tflops, "rows": [asdict(row) for row in rows]}
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path
