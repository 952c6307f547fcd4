"""The fused-rotary lever: the model code's rotary position embedding, one Triton kernel
a forward and one a backward for each of the query and the key.

The model code computes ``x * cos + rotate_half(x) * sin`` in eager ops: a negation, a
concatenation, two products and a sum, each a pass over the whole activation, and as
many again in the backward pass (where the selective layers also recompute the
forward). The kernels here read x once and write the result once, and round as those
eager ops round: each product and the sum are computed from the 16-bit inputs and
rounded to the input's dtype (the kernel is compiled without mul-add fusion, which
would round a product and the sum once), so the outputs and the input gradients are the
same numbers: tests/bench/trainer run the kernels in Triton's CPU interpreter in fp16
(its bf16 conversion truncates) and find no fused multiply-add in their sm_90 build;
tests/gpu/test_gpu.py compares them with the model code's on CUDA in fp16 and bf16.
The lever stays off by default until that GPU test has passed (docs/PERFORMANCE.md).

Only 16-bit CUDA tensors take the kernels; anything else (CPU, float32: the float32
reference) runs the model code's own function.
"""

from __future__ import annotations

import functools
import sys

import torch

from bench.trainer.kernel_support import COMPILE_OPTIONS, last_dim_dense, takes_kernel

ROWS_A_PROGRAM = 16


def fuse_rotary(llm: torch.nn.Module) -> None:
    """Route the ``apply_rotary_pos_emb`` of ``llm``'s model code (the module that
    defines its attention classes) through ``fused_apply_rotary_pos_emb``, where that
    function computes what this module computes (``_computes_the_same``)."""
    for name in sorted({type(module).__module__ for module in llm.modules()}):
        code = sys.modules.get(name)
        original = getattr(code, "apply_rotary_pos_emb", None)
        if original is None or isinstance(original, functools.partial):
            continue
        if _computes_the_same(original):
            code.apply_rotary_pos_emb = functools.partial(fused_apply_rotary_pos_emb, original)


def fused_apply_rotary_pos_emb(original, q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
    """``original(q, k, cos, sin, ...)`` (the model code's), the products in the kernels
    where the tensors are 16-bit CUDA ones of the shapes the attention passes:
    q and k (batch, heads, positions, head size), cos and sin (batch or 1, positions,
    head size)."""
    if not (
        unsqueeze_dim == 1
        and takes_kernel(q)
        and q.dtype == k.dtype == cos.dtype == sin.dtype
        and q.dim() == k.dim() == 4
        and cos.dim() == 3
        and cos.shape == sin.shape
        and cos.shape[0] in (1, q.shape[0])
        and cos.shape[1:] == q.shape[2:]
        and k.shape[0] == q.shape[0]
        and k.shape[2:] == q.shape[2:]
        and q.shape[-1] % 2 == 0
    ):
        return original(q, k, cos, sin, position_ids, unsqueeze_dim)
    return RotaryEmbedding.apply(q, cos, sin), RotaryEmbedding.apply(k, cos, sin)


def _computes_the_same(original) -> bool:
    """Whether ``original`` is ``x * cos + rotate_half(x) * sin`` with cos and sin
    broadcast over the heads and position_ids unused (the convention this module
    implements): checked on small float32 CPU tensors, so that another revision of the
    model code (one that indexes cos by position_ids, say) keeps its own function."""
    generator = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, heads, 5, 8, generator=generator) for heads in (4, 2))
    cos, sin = (torch.randn(2, 5, 8, generator=generator) for _ in range(2))
    positions = torch.arange(5).flip(0).expand(2, 5)
    try:
        results = [original(q, k, cos, sin), original(q, k, cos, sin, positions)]
    except Exception:  # noqa: BLE001 - another signature: not this convention
        return False
    expected = [rotated_by_ops(q, cos, sin), rotated_by_ops(k, cos, sin)]
    return all(
        isinstance(result, tuple) and len(result) == 2 and all(torch.equal(r, e) for r, e in zip(result, expected))
        for result in results
    )


def rotated_by_ops(x, cos, sin):
    """x (batch, heads, positions, head size) rotated in torch ops: the kernels' convention."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class RotaryEmbedding(torch.autograd.Function):
    """x (batch, heads, positions, head size; any strides with the head size's 1) rotated
    by cos and sin (batch or 1, positions, head size); the gradient flows to x only, as in
    the model code, where cos and sin come from the positions without gradients."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return rotate(x, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return rotate(grad, cos, sin, backward=True), None, None


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    """The forward's output for x, or (``backward``) the input gradient for x's place
    taken by the output's gradient, in a new tensor laid out as an eager op lays out its
    output (``empty_like``)."""
    x = last_dim_dense(x)
    out = torch.empty_like(x)
    rotate_into(x.unsqueeze(2), cos, sin, out.unsqueeze(2), backward)
    return out


def rotate_into(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor, backward: bool) -> None:
    """``rotate`` written into ``out``, for x and out (batch, key-value heads, query heads
    of each, positions, head size) views of any strides with the head size's 1: a
    packed projection's query heads are read, or its gradient's written, in place
    (bench/trainer/grouped_attention.py); a plain (batch, heads, ...) tensor is one
    head a group."""
    cos, sin = cos.contiguous(), sin.contiguous()
    batch, groups, group, positions, size = x.shape
    rows = batch * groups * group * positions
    grid = (-(-rows // ROWS_A_PROGRAM),)
    _kernel()[grid](
        x,
        cos,
        sin,
        out,
        *x.stride()[:4],
        *out.stride()[:4],
        cos.stride(0) if cos.shape[0] > 1 else 0,  # one row of positions for the whole batch
        cos.stride(1),
        rows,
        groups * group,
        group,
        positions,
        size,
        ROWS=ROWS_A_PROGRAM,
        SIZE=1 << (size - 1).bit_length(),
        BACKWARD=backward,
        **COMPILE_OPTIONS,
    )


@functools.cache
def _kernel():
    """The Triton kernel, compiled where first used: only the trainer on a GPU imports Triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def rotary(
        x_ptr, cos_ptr, sin_ptr, out_ptr, xb, xk, xg, xs, ob, ok, og, os, cb, cs, rows, heads, group, positions, size,
        ROWS: tl.constexpr, SIZE: tl.constexpr, BACKWARD: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
        column = tl.arange(0, SIZE)
        b = row // (heads * positions)
        h = (row // positions) % heads
        kv, g = h // group, h % group  # the key-value head and the query head within its group
        s = row % positions
        half = size // 2
        first_half = (column < half)[None, :]
        partner = tl.where(column < half, column + half, column - half)[None, :]
        column = column[None, :]
        mask = (row < rows)[:, None] & (column < size)
        x_row = (b * xb + kv * xk + g * xg + s * xs)[:, None]
        trig_row = (b * cb + s * cs)[:, None]
        x = tl.load(x_ptr + x_row + column, mask=mask, other=0.0).to(tl.float32)
        x_partner = tl.load(x_ptr + x_row + partner, mask=mask, other=0.0).to(tl.float32)
        cos = tl.load(cos_ptr + trig_row + column, mask=mask, other=0.0).to(tl.float32)
        dtype = out_ptr.dtype.element_ty
        if BACKWARD:
            # autograd of the forward's eager ops: x (the output's gradient) * cos, plus
            # the gradient through rotate_half of x * sin: the partner column's
            # product, negated for the second half
            sin = tl.load(sin_ptr + trig_row + partner, mask=mask, other=0.0).to(tl.float32)
            turned = (x_partner * sin).to(dtype).to(tl.float32)
            turned = tl.where(first_half, turned, -turned)
        else:
            # x * cos + rotate_half(x) * sin, where rotate_half(x) = (-x2, x1)
            sin = tl.load(sin_ptr + trig_row + column, mask=mask, other=0.0).to(tl.float32)
            turned = (tl.where(first_half, -x_partner, x_partner) * sin).to(dtype).to(tl.float32)
        # each product and the sum rounded to the dtype, as the eager ops round them
        kept = (x * cos).to(dtype).to(tl.float32)
        out_row = (b * ob + kv * ok + g * og + s * os)[:, None]
        tl.store(out_ptr + out_row + column, (kept + turned).to(dtype), mask=mask)

    return rotary
