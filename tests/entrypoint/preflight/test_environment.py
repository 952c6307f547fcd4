"""Which of NVML's GPUs this process sees: NVML lists the machine's, CUDA the visible ones."""

from __future__ import annotations

import pytest

from entrypoint.preflight.environment import visible_nvml_indices

NVML = ["GPU-aaaa", "GPU-bbbb", "GPU-cccc", "GPU-dddd"]

# name: (torch's UUIDs, CUDA_VISIBLE_DEVICES, NVML indices in CUDA's order)
CASES = {
    "all visible": (None, None, [0, 1, 2, 3]),
    "CUDA_VISIBLE_DEVICES=3,1 by index": (None, "3,1", [3, 1]),
    "CUDA_VISIBLE_DEVICES by UUID": (None, "GPU-cccc,GPU-aaaa", [2, 0]),
    "CUDA stops at the first entry it cannot match": (None, "1,9,2", [1]),
    "torch's UUIDs decide, without the GPU- prefix": (["dddd", "bbbb"], "3,1", [3, 1]),
    "torch's UUIDs decide over a stale variable": (["cccc"], "0", [2]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_visible_gpus_are_matched_to_nvml(name):
    torch_uuids, variable, expected = CASES[name]
    assert visible_nvml_indices(NVML, torch_uuids, variable) == expected
