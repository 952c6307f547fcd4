"""Run under torchrun on every process of the job, before training.

It proves the whole job can talk (an all-gather of where each process runs) and,
on GPUs, times an NCCL all-reduce. Bus bandwidth is defined as in nccl-tests:
algbw = bytes / time, busbw = algbw x 2(n-1)/n for all-reduce.

Usage: python -m torch.distributed.run ... -m entrypoint.job.collective RESULT.json
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

ALLREDUCE_BYTES = 256 * 2**20
WARMUP, TIMED = 5, 20


def bus_bandwidth_gbps(message_bytes: int, seconds: float, world_size: int) -> float:
    """nccl-tests' all-reduce bus bandwidth in GB/s (10^9 bytes)."""
    algorithm_bandwidth = message_bytes / seconds
    return algorithm_bandwidth * 2 * (world_size - 1) / world_size / 1e9


def _time_allreduce(torch, dist, world_size: int) -> dict:
    tensor = torch.ones(ALLREDUCE_BYTES // 2, dtype=torch.bfloat16, device="cuda")
    for _ in range(WARMUP):
        dist.all_reduce(tensor)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(TIMED):
        dist.all_reduce(tensor)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / TIMED
    return {
        "message_bytes": ALLREDUCE_BYTES,
        "iterations": TIMED,
        "seconds_per_allreduce": seconds,
        "bus_bandwidth_gbps": bus_bandwidth_gbps(ALLREDUCE_BYTES, seconds, world_size),
    }


def main(result_path: str) -> None:
    import torch
    import torch.distributed as dist

    on_gpu = torch.cuda.is_available()
    local_rank = int(os.environ["LOCAL_RANK"])
    if on_gpu:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if on_gpu else "gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    here = {
        "rank": rank,
        "node_rank": int(os.environ["GROUP_RANK"]),
        "local_rank": local_rank,
        "host": socket.gethostname(),
        "gpu": torch.cuda.get_device_name(local_rank) if on_gpu else None,
    }
    placement = [None] * world_size
    dist.all_gather_object(placement, here)
    result = {"backend": dist.get_backend(), "world_size": world_size, "placement": placement}
    if on_gpu and world_size > 1:
        result["allreduce"] = _time_allreduce(torch, dist, world_size)
    if rank == 0:
        Path(result_path).write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
