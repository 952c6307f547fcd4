"""Provenance of a run: what hardware and software it ran on.

Versions are read from package metadata rather than by importing the packages, so
collecting them costs nothing and cannot fail on a broken install.
"""
from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "deepspeed", "transformers", "mmengine", "bitsandbytes", "xtuner", "accelerate", "peft", "datasets")
# Written by the image build (Dockerfile); absent outside the image.
IMAGE_LABELS_FILE = Path("/etc/llava-bench/image.json")


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def gpu_inventory_details() -> list[dict]:
    """Every visible GPU: index, name, memory, driver, UUID (NVML, else torch)."""
    import torch

    count = torch.cuda.device_count()
    if count == 0:
        return []
    try:
        import pynvml

        pynvml.nvmlInit()
        driver = pynvml.nvmlSystemGetDriverVersion()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        return [
            {
                "index": index,
                "name": pynvml.nvmlDeviceGetName(handle),
                "memory_mib": pynvml.nvmlDeviceGetMemoryInfo(handle).total // 2**20,
                "driver": driver,
                "uuid": pynvml.nvmlDeviceGetUUID(handle),
            }
            for index, handle in enumerate(handles)
        ][:count]
    except Exception:  # noqa: BLE001 - NVML is optional; torch still names the GPUs
        return [
            {
                "index": index,
                "name": torch.cuda.get_device_name(index),
                "memory_mib": torch.cuda.get_device_properties(index).total_memory // 2**20,
                "driver": None,
                "uuid": None,
            }
            for index in range(count)
        ]


def software() -> dict:
    """Python, CUDA stack and training-stack versions of this node."""
    import torch

    cuda = torch.version.cuda
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda and torch.cuda.is_available() else None,
        "packages": package_versions(),
        "image": json.loads(IMAGE_LABELS_FILE.read_text()) if IMAGE_LABELS_FILE.is_file() else None,
    }
