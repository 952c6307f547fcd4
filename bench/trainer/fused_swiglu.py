"""The fused-SwiGLU lever: the MLP's ``silu(gate) * up`` in one Triton kernel a forward
and one a backward.

The model code computes ``act_fn(w1(x)) * w3(x)`` in eager ops: the SiLU writes its
output, the product reads it back, and autograd keeps it for the backward pass, whose
three kernels (two products and SiLU's gradient) read and write the 16,384-wide
activations again; at batch 32 those passes were about 3 % of the default's profiled
step on an H200 (docs/PERFORMANCE.md). The kernels here read the gate and up
projections once and write the product, or read them and the output's gradient once
and write both input gradients, and keep nothing but the two projections (what a
selective layer keeps anyway). They compute what the eager ops compute, in fp32 from
the 16-bit inputs: SiLU as x / (1 + exp(-x)), rounded to the dtype before the
product, as the eager SiLU's output is; the products and SiLU's gradient
dy * s * (1 + x * (1 - s)), s the sigmoid, each rounded as autograd's ops round. Where
the exponential or a compiler's choice differed from torch's build in the last fp32
bit an element could round the other way, so tests/gpu/test_gpu.py allows a
thousandth of them within two roundings; on the H200 (2026-12-04) none differed, in
fp16 or bf16, and `perf`'s math check agreed against the exact run.

Only 16-bit CUDA tensors take the kernels; anything else (CPU, float32: the float32
reference) runs the model code's own forward.
"""

from __future__ import annotations

import functools
import os

import torch

from bench.trainer.kernel_support import COMPILE_OPTIONS, takes_kernel

BLOCK = 1024
# Triton's CPU interpreter (the tests') runs numpy's exp for libdevice's, which it lacks.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# The MLP's linear layers by model code: gate, up, down.
PROJECTIONS = (("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj"))  # InternLM2, Llama


def fuse_swiglu(mlp: torch.nn.Module) -> bool:
    """Route ``mlp``'s forward through ``swiglu`` where its class computes
    ``down(silu(gate(x)) * up(x))`` (``_computes_swiglu``, so that another activation
    or a revision with other terms keeps its own forward); whether it was routed."""
    names = next((names for names in PROJECTIONS if all(hasattr(mlp, name) for name in names)), None)
    if names is None or not _computes_swiglu(mlp, names):
        return False
    gate, up, down = names

    def forward(x):
        return getattr(mlp, down)(swiglu(getattr(mlp, gate)(x), getattr(mlp, up)(x)))

    mlp.forward = forward
    return True


def _computes_swiglu(mlp: torch.nn.Module, names: tuple[str, str, str]) -> bool:
    """Whether the forward of ``mlp``'s class is down(silu(gate(x)) * up(x)): run with
    small float32 CPU projections in place of its own (whatever their device and
    dtype), which are put back."""
    generator = torch.Generator().manual_seed(0)
    small = []
    for inputs, outputs in ((4, 6), (4, 6), (6, 4)):  # gate, up, down
        linear = torch.nn.Linear(inputs, outputs, bias=False)
        linear.weight.data = torch.randn(outputs, inputs, generator=generator)
        small.append(linear)
    own = [getattr(mlp, name) for name in names]
    probe = torch.randn(2, 3, 4, generator=generator)
    try:
        for name, linear in zip(names, small):
            setattr(mlp, name, linear)
        with torch.no_grad():
            expected = small[2](torch.nn.functional.silu(small[0](probe)) * small[1](probe))
            return torch.equal(type(mlp).forward(mlp, probe), expected)
    except Exception:  # noqa: BLE001 - another signature or other terms: not this function
        return False
    finally:
        for name, linear in zip(names, own):
            setattr(mlp, name, linear)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``: in the kernels where both are 16-bit CUDA tensors of one
    shape and dtype, else the eager ops."""
    if takes_kernel(gate) and up.dtype == gate.dtype and up.shape == gate.shape and up.device == gate.device:
        return SwiGLU.apply(gate, up)
    return torch.nn.functional.silu(gate) * up


class SwiGLU(torch.autograd.Function):
    """silu(gate) * up, keeping only gate and up for the backward pass."""

    @staticmethod
    def forward(ctx, gate, up):
        gate, up = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(gate, up)
        out = torch.empty_like(gate)
        _launch(gate, up, out, gate, up, backward=False)
        return out

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        grad_gate, grad_up = torch.empty_like(gate), torch.empty_like(up)
        _launch(gate, up, grad.contiguous(), grad_gate, grad_up, backward=True)
        return grad_gate, grad_up


def _launch(gate, up, third, first_out, second_out, backward: bool) -> None:
    """The forward (``third`` the output; the out pointers unused) or the backward
    (``third`` the output's gradient; the out pointers the gate's and up's gradients),
    over all of gate's elements."""
    if elements := gate.numel():
        _kernel()[(-(-elements // BLOCK),)](
            gate, up, third, first_out, second_out, elements,
            BLOCK=BLOCK, BACKWARD=backward, LIBDEVICE=not INTERPRETED, **COMPILE_OPTIONS,
        )  # fmt: skip


@functools.cache
def _kernel():
    """The Triton kernel, compiled where first used: only the trainer on a GPU imports Triton."""
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    @triton.jit
    def swiglu(
        gate_ptr, up_ptr, third_ptr, gate_grad_ptr, up_grad_ptr, elements,
        BLOCK: tl.constexpr, BACKWARD: tl.constexpr, LIBDEVICE: tl.constexpr,
    ):  # fmt: skip
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < elements
        dtype = gate_ptr.dtype.element_ty
        gate = tl.load(gate_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        # torch's SiLU: x / (1 + exp(-x)) in fp32, an IEEE division and CUDA's expf, as its
        # build computes them (Triton's own exp is an approximation; its interpreter has no libdevice)
        denominator = 1.0 + (libdevice.exp(-gate) if LIBDEVICE else tl.exp(-gate))
        activation = tl.math.div_rn(gate, denominator).to(dtype).to(tl.float32)
        if BACKWARD:
            grad = tl.load(third_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            tl.store(up_grad_ptr + offsets, (grad * activation).to(dtype), mask=mask)
            grad_activation = (grad * up).to(dtype).to(tl.float32)
            # torch's SiLU gradient: dy * s * (1 + x * (1 - s)), s = 1 / (1 + exp(-x)); its
            # build (nvcc's default contraction) computes 1 + x * (1 - s) as one multiply-add
            sigmoid = tl.math.div_rn(1.0, denominator)
            slope = tl.fma(gate, 1.0 - sigmoid, 1.0)
            tl.store(gate_grad_ptr + offsets, (grad_activation * sigmoid * slope).to(dtype), mask=mask)
        else:
            tl.store(third_ptr + offsets, (activation * up).to(dtype), mask=mask)

    return swiglu
