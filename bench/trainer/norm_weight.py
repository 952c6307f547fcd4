"""The RMSNorm's weight product in one Triton kernel each way (part of the fused-norm lever).

The model code multiplies the normalized activation by the norm's frozen weight in an
eager ``weight * x``. The weight, broadcast over the rows, sends torch to its strided
elementwise kernel, which on an H200 took 0.34 ms a product at batch 32 x 604
positions x 6,144 in bf16: about a third of the card's memory bandwidth, and 2.8 % of
the default's profiled step (286 products a step, the backward's included;
docs/PERFORMANCE.md). The kernel here reads x and the weight once, row blocks by
column blocks, and computes each product as that op computes it: both factors in
fp32, one product, one rounding to x's dtype. A single product leaves no mul-add to
fuse, so the numbers are the same; the backward pass is the same product with the
output's gradient (the weight takes no gradient).
"""

from __future__ import annotations

import functools

import torch

from bench.trainer.kernel_support import takes_kernel

ROWS_A_PROGRAM = 8
COLUMNS_A_PROGRAM = 1024


def weight_product(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``weight * x`` for a weight over x's last dimension: in the kernel where x is a
    16-bit CUDA tensor and the weight a frozen one of its dtype, else the eager op."""
    if takes_kernel(x) and weight.dtype == x.dtype and weight.shape == x.shape[-1:] and not weight.requires_grad:
        return WeightProduct.apply(weight, x)
    return weight * x


class WeightProduct(torch.autograd.Function):
    """x times a frozen weight, row by row; the gradient flows to x only."""

    @staticmethod
    def forward(ctx, weight, x):
        ctx.save_for_backward(weight)
        return scale_rows(x, weight)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return None, scale_rows(grad, weight)


def scale_rows(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Each row of x times the weight, in a new contiguous tensor of x's shape and dtype."""
    x = x.contiguous()
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    width = weight.numel()
    rows = x.numel() // width if width else 0
    if rows == 0:
        return out
    grid = (-(-rows // ROWS_A_PROGRAM), -(-width // COLUMNS_A_PROGRAM))
    _kernel()[grid](x, weight.contiguous(), out, rows, width, ROWS=ROWS_A_PROGRAM, COLUMNS=COLUMNS_A_PROGRAM)
    return out


@functools.cache
def _kernel():
    """The Triton kernel, compiled where first used: only the trainer on a GPU imports Triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def weight_product(x_ptr, weight_ptr, out_ptr, rows, width, ROWS: tl.constexpr, COLUMNS: tl.constexpr):
        row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
        column = tl.program_id(1) * COLUMNS + tl.arange(0, COLUMNS)
        in_width = column < width
        mask = (row < rows)[:, None] & in_width[None, :]
        offsets = row[:, None] * width + column[None, :]
        weight = tl.load(weight_ptr + column, mask=in_width, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        # torch's product of two 16-bit tensors: in fp32, rounded once to their dtype
        tl.store(out_ptr + offsets, (x * weight[None, :]).to(out_ptr.dtype.element_ty), mask=mask)

    return weight_product
