"""The commands the appliance launches, as plain data: XTuner's trainer under torchrun
with DeepSpeed ZeRO-2 on GPUs (one plain process on CPU), and torchrun for other programs."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from entrypoint.job.topology import Topology


def xtuner_train_script() -> Path:
    """XTuner's ``tools/train.py`` in the running Python's environment."""
    spec = importlib.util.find_spec("xtuner")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"XTuner is not installed for {sys.executable}")
    return Path(next(iter(spec.submodule_search_locations))) / "tools" / "train.py"


# XTuner's own ZeRO-2 config, by the name the seed passes to --deepspeed.
DEEPSPEED_CONFIG = "deepspeed_zero2"


def write_float32_deepspeed_config(folder: Path) -> Path:
    """XTuner's ZeRO-2 config without its fp16 and bf16 sections, written into ``folder``.
    Both are "auto", which XTuner turns into bf16 on a GPU that has it; without them
    DeepSpeed trains in float32 (the float32 reference)."""
    packaged = xtuner_train_script().parent.parent / "configs" / "deepspeed" / f"{DEEPSPEED_CONFIG}.json"
    config = {key: value for key, value in json.loads(packaged.read_text()).items() if key not in ("fp16", "bf16")}
    path = folder / f"{DEEPSPEED_CONFIG}_float32.json"
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


@dataclass(frozen=True)
class LaunchPlan:
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    logs_dir: Path
    distributed: bool  # torchrun with one process per GPU; else one plain process (CPU)
    program: tuple[str, ...] = ()  # a trainer's: the end of argv the launcher runs (the script and its arguments)

    @property
    def launcher(self) -> list[str]:
        """argv before the program: the interpreter, or torchrun and its arguments."""
        return self.argv[: len(self.argv) - len(self.program)]


def offline_environment() -> dict[str, str]:
    """This process's environment for a child that must never reach the network."""
    return {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        # The layout holds every file; nothing is ever fetched at run time.
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }


def torchrun_plan(topology: Topology, program: list[str], logs_dir: Path, cwd: Path) -> LaunchPlan:
    """torchrun with the topology's explicit arguments; each rank's output in its own files."""
    argv = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *topology.torchrun_args(),
        "--log-dir",
        str(logs_dir / "ranks"),
        "--redirects",
        "3",
        "--tee",
        "3",
        *program,
    ]
    return LaunchPlan(argv, offline_environment(), cwd, logs_dir, distributed=True)


def trainer_plan(
    program: list[str], logs_dir: Path, cwd: Path, device: str, topology: Topology, float32: bool
) -> LaunchPlan:
    """``program`` as the trainer: under torchrun on GPUs, one plain process on CPU; the
    float32 reference with TF32 off (cuBLAS and cuDNN, the ViT's convolution, in true
    float32: read when CUDA starts, so it is set at the launch)."""
    if device == "cpu":
        plan = LaunchPlan([sys.executable, *program], offline_environment(), cwd, logs_dir, distributed=False)
    else:
        plan = torchrun_plan(topology, program, logs_dir, cwd)
        if float32:
            plan.env["NVIDIA_TF32_OVERRIDE"] = "0"
    return replace(plan, program=tuple(program))


def training_plan(
    config: Path,
    work_dir: Path,
    logs_dir: Path,
    cwd: Path,
    device: str,
    topology: Topology,
    cfg_options: list[str] = (),
    deepspeed: str | Path = DEEPSPEED_CONFIG,
) -> LaunchPlan:
    """The exact training command: torchrun + DeepSpeed ZeRO-2 on GPUs, one plain process on CPU.

    ``cwd`` is the layout root, as in the seed's procedure, so a user's config with
    relative paths (``./data/...``) resolves them there. ``deepspeed`` other than XTuner's
    config is the float32 reference's.
    """
    train_args = [str(config), "--work-dir", str(work_dir)]
    if cfg_options:
        train_args += ["--cfg-options", *cfg_options]
    train_args += (
        ["--launcher", "none"] if device == "cpu" else ["--deepspeed", str(deepspeed), "--launcher", "pytorch"]
    )
    program = [str(xtuner_train_script()), *train_args]
    return trainer_plan(program, logs_dir, cwd, device, topology, float32=deepspeed != DEEPSPEED_CONFIG)


# What the trainer imports after train.py's own imports (and the gate's start-up note):
# the recipe template's modules (its config imports them) and, on GPUs, DeepSpeed
# (train.py's main imports it).
TRAINER_IMPORTS = (
    "xtuner.dataset",
    "xtuner.engine.hooks",
    "xtuner.engine.runner",
    "xtuner.model",
    "bench.trainer.hooks",
    "bench.trainer.cached_dataset",
    "bench.trainer.levered_llava",
)
TRAINER_IMPORTS_ON_GPUS = ("deepspeed", "mmengine._strategy.deepspeed")


def gated_plan(gate: Path, logs_dir: Path, cwd: Path, device: str, topology: Topology, float32: bool) -> LaunchPlan:
    """The trainer launched before its config exists: bench.trainer.gate imports what
    train.py and the config will, then waits at ``gate`` for train.py's arguments."""
    imports = TRAINER_IMPORTS + (TRAINER_IMPORTS_ON_GPUS if device == "cuda" else ())
    program = ["-m", "bench.trainer.gate", str(gate), *imports]
    return trainer_plan(program, logs_dir, cwd, device, topology, float32)
