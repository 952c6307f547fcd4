"""What the Triton kernels of the model levers share: which tensors take them and how
they are built."""

from __future__ import annotations

import importlib.util

import torch

# The activations' dtypes the kernels are written for; float32 (the reference) runs the eager ops.
FUSED_DTYPES = (torch.float16, torch.bfloat16)
# Whose tensors take the kernels: Triton compiles for GPUs (tests add "cpu" under Triton's interpreter).
KERNEL_DEVICES = {"cuda"}
# No mul-add contraction (Triton fuses by default): an FMA would round a product and the
# sum once, where the eager ops round each (on an H200 the fused build differed from them).
COMPILE_OPTIONS = {"enable_fp_fusion": False}


# torch's CUDA wheels bring Triton from 2.0 on; a build without it runs the eager ops.
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def takes_kernel(x: torch.Tensor) -> bool:
    """Whether ``x``'s device and dtype are those the kernels run on, Triton installed."""
    return TRITON_INSTALLED and x.device.type in KERNEL_DEVICES and x.dtype in FUSED_DTYPES


def last_dim_dense(x: torch.Tensor) -> torch.Tensor:
    """``x``, copied only where its last dimension is strided (the kernels index it by one)."""
    return x if x.stride(-1) == 1 else x.contiguous()
