"""Provenance of a run: what hardware and software it ran on.

Versions are read from package metadata rather than by importing the packages, so
collecting them costs nothing and cannot fail on a broken install.
"""

from __future__ import annotations

import json
import pkgutil
import platform
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

PACKAGES = (
    "torch",
    "deepspeed",
    "transformers",
    "mmengine",
    "bitsandbytes",
    "xtuner",
    "accelerate",
    "peft",
    "datasets",
)
# Written by the image build (Dockerfile); absent outside the image.
IMAGE_LABELS_FILE = Path("/etc/llava-bench/image.json")


def package_versions() -> dict[str, str | None]:
    return {name: _installed_version(name) for name in PACKAGES}


def visible_nvml_indices(
    nvml_uuids: list[str], torch_uuids: list[str] | None, cuda_visible_devices: str | None
) -> list[int]:
    """Which of NVML's GPUs (it lists every GPU of the machine) are the ones this
    process sees, in CUDA's order: by UUID where torch reports it, else by
    CUDA_VISIBLE_DEVICES (indices or UUIDs), else all of them."""

    def bare(uuid: str) -> str:
        return uuid.strip().removeprefix("GPU-").lower()

    by_uuid = {bare(uuid): index for index, uuid in enumerate(nvml_uuids)}
    if torch_uuids:
        return [by_uuid[bare(uuid)] for uuid in torch_uuids if bare(uuid) in by_uuid]
    if cuda_visible_devices is None or not cuda_visible_devices.strip():
        return list(range(len(nvml_uuids)))
    indices = []
    for entry in (part.strip() for part in cuda_visible_devices.split(",")):
        if entry.isdigit() and int(entry) < len(nvml_uuids):
            indices.append(int(entry))
        elif bare(entry) in by_uuid:
            indices.append(by_uuid[bare(entry)])
        else:
            break  # CUDA stops at the first entry it cannot match
    return indices


def _torch_uuids(torch, count: int) -> list[str] | None:
    try:
        return [str(torch.cuda.get_device_properties(index).uuid) for index in range(count)]
    except (AttributeError, RuntimeError):
        return None


def gpu_inventory_details() -> list[dict]:
    """Every visible GPU, in CUDA's order: index, name, memory, driver, UUID (NVML,
    matched to the visible devices; else torch)."""
    import os

    import torch

    count = torch.cuda.device_count()
    if count == 0:
        return []
    try:
        import pynvml

        pynvml.nvmlInit()
        driver = pynvml.nvmlSystemGetDriverVersion()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        uuids = [pynvml.nvmlDeviceGetUUID(handle) for handle in handles]
        visible = visible_nvml_indices(uuids, _torch_uuids(torch, count), os.environ.get("CUDA_VISIBLE_DEVICES"))
        return [
            {
                "index": index,
                "name": pynvml.nvmlDeviceGetName(handles[physical]),
                "memory_mib": pynvml.nvmlDeviceGetMemoryInfo(handles[physical]).total // 2**20,
                "driver": driver,
                "uuid": uuids[physical],
            }
            for index, physical in enumerate(visible[:count])
        ]
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


def gpu_inventory() -> tuple[int, str, str | None]:
    """(visible GPUs, model name or "cpu", driver version or None)."""
    import torch

    count = torch.cuda.device_count()
    if count == 0:
        return 0, "cpu", None
    driver = None
    try:
        import pynvml

        pynvml.nvmlInit()
        driver = pynvml.nvmlSystemGetDriverVersion()
    except Exception:  # noqa: BLE001 - the driver version is provenance, not a requirement
        pass
    return count, torch.cuda.get_device_name(0), driver


def missing_apis(paths: Iterable[str]) -> dict[str, str]:
    """Each dotted path (``torch.nn.functional.rms_norm``) this install cannot resolve,
    with why: its package does not import, or the name is not there (an older version)."""
    missing = {}
    for path in paths:
        root = path.split(".")[0]
        try:
            pkgutil.resolve_name(path)
        except ImportError:
            missing[path] = f"{root} is not installed"
        except AttributeError:
            version = _installed_version(root)
            missing[path] = f"{root} {version} lacks it" if version else f"the installed {root} lacks it"
    return missing


def _installed_version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def xtuner_provenance() -> tuple[str, str | None]:
    """Installed XTuner version, and the git commit when pip recorded one (PEP 610)."""
    distribution = metadata.distribution("xtuner")
    direct_url = distribution.read_text("direct_url.json")
    commit = json.loads(direct_url).get("vcs_info", {}).get("commit_id") if direct_url else None
    return distribution.version, commit
