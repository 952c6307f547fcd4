"""A smaller GPU simulated on a larger one (docs/PERFORMANCE.md, "Method")."""

from __future__ import annotations

import os


def cap_gpu_memory(mib: int) -> None:
    """Hold this rank's GPU to ``mib`` MiB, so a run on an H200 meets the out-of-memory
    failures a card of that size would: PyTorch's allocator gets ``mib`` less what the
    process already holds outside it (the CUDA context, as on the smaller card).
    Called by the rendered config while each rank parses it, before any weight is
    loaded; nothing on CPU."""
    import torch

    if not torch.cuda.is_available():
        return
    device = int(os.environ.get("LOCAL_RANK", "0"))
    total = torch.cuda.get_device_properties(device).total_memory
    free, _ = torch.cuda.mem_get_info(device)
    outside = total - free
    allocator = max(0, mib * 2**20 - outside)
    torch.cuda.set_per_process_memory_fraction(min(1.0, allocator / total), device)
    print(
        f"llava-bench: GPU {device} held to {mib} MiB of {total // 2**20} MiB: "
        f"{allocator // 2**20} MiB for PyTorch's allocator, {outside // 2**20} MiB already outside it",
        flush=True,
    )
