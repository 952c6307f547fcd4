"""`llava-bench perf`: stock XTuner and the appliance's levers, back to back on the same GPUs.

Each variant is a real `llava-bench run` of the same layout with the same seed, steps
and global batch, differing only in its lever options; the table compares time per
step, data share, peak memory, MFU and start-up with the stock run, and how far each
loss curve departs from stock's (the levers must not change the math).
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

# Variant name -> `llava-bench run` lever options. Each single-lever variant switches
# exactly one lever on over stock, so its own effect is measured.
_ALL_OFF = {"--dataloader-workers": "0", "--no-pin-memory": None, "--no-dequantize-nf4": None, "--no-tokenized-cache": None}


def _only(**on: str | None) -> list[str]:
    """Stock with the named levers switched on (option -> value, None for a flag)."""
    chosen = dict(_ALL_OFF)
    for option, value in on.items():
        option = "--" + option.replace("_", "-")
        chosen.pop("--no-" + option[2:], None)
        chosen[option] = value
    return [part for option, value in chosen.items() for part in (option, value) if part is not None]


VARIANTS = {
    "stock": ["--stock"],
    "workers": _only(dataloader_workers="4", pin_memory=None),
    "dequantize": _only(dequantize_nf4=None),
    "tokenized-cache": _only(tokenized_cache=None),
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
    startup_seconds: float | None
    ratio_vs_stock: float | None  # seconds per step / stock's
    max_loss_difference: float | None  # over the steps both logged, vs stock
    levers: dict | None
    run_dir: str


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


def compare(verdicts: dict[str, dict]) -> list[PerfRow]:
    """One row per variant, against the stock variant when there is one."""
    stock = verdicts.get("stock")
    stock_speed = ((stock or {}).get("throughput") or {}).get("seconds_per_step", {}).get("median")
    stock_losses = _losses(stock) if stock else {}
    rows = []
    for variant, verdict in verdicts.items():
        throughput = verdict.get("throughput") or {}
        speed = (throughput.get("seconds_per_step") or {}).get("median")
        losses = _losses(verdict)
        common = sorted(set(losses) & set(stock_losses))
        rows.append(
            PerfRow(
                variant=variant,
                termination=verdict["termination"]["kind"],
                seconds_per_step=speed,
                data_time_share=throughput.get("data_time_share"),
                peak_memory_mib=throughput.get("peak_memory_mib"),
                mfu=throughput.get("mfu"),
                startup_seconds=(verdict.get("timing") or {}).get("startup_seconds"),
                ratio_vs_stock=speed / stock_speed if speed and stock_speed else None,
                max_loss_difference=max((abs(losses[s] - stock_losses[s]) for s in common), default=None),
                levers=(verdict.get("recipe") or {}).get("levers"),
                run_dir=verdict.get("_run_dir", ""),
            )
        )
    return rows


def table(rows: list[PerfRow]) -> str:
    """Plain text, one line per variant (also what docs/PERFORMANCE.md quotes)."""

    def cell(value, form):
        return "-" if value is None else format(value, form)

    lines = ["variant     run        s/step  x stock  data  peak MiB   MFU  start s  max |dloss|"]
    for row in rows:
        lines.append(
            f"{row.variant:<11} {row.termination:<9} {cell(row.seconds_per_step, '7.3f')} {cell(row.ratio_vs_stock, '8.3f')}"
            f" {cell(row.data_time_share, '5.1%')} {cell(row.peak_memory_mib, '9.0f')} {cell(row.mfu, '5.3f')}"
            f" {cell(row.startup_seconds, '8.1f')} {cell(row.max_loss_difference, '12.2e')}"
        )
    return "\n".join(lines)


def write_report(out: Path, rows: list[PerfRow], run_options: list[str]) -> Path:
    path = out / "perf.json"
    path.write_text(json.dumps({"run_options": run_options, "rows": [asdict(row) for row in rows]}, indent=2) + "\n")
    return path
