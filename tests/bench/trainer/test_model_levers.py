"""The levers the model applies (bench/trainer/levered_llava.py), on InternLM2's own code:
what each skips or keeps, and that the loss and the gradients stay the same.

The dequantized-NF4 lever needs CUDA and bitsandbytes' GPU kernels; its loss-curve
agreement with stock NF4 is checked on the GPU machine (tests/gpu/test_gpu.py)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from bench.core.layout import Layout
from tests.conftest import REPO, short_cpu_run


def _one_training_step(
    layout: Path, model_class, attention: str = "eager", during_step=contextlib.nullcontext, **levers
) -> tuple[Counter, float, list]:
    """Build the model from the tiny layout as XTuner's config does (InternLM2's own code,
    ``attention`` as the attention lever asks), run one forward and backward (inside
    ``during_step()``), and return the MLP calls of each LLM layer and of the ViT's first
    layer (a recomputed layer calls its MLP again), the rows the output projection
    computed (key "logits"), the loss and the projector's gradients."""
    import torch
    from transformers import AutoModelForCausalLM, CLIPVisionModel
    from xtuner.utils import IMAGE_TOKEN_INDEX

    paths = Layout.at(layout)
    torch.manual_seed(0)  # the projector's initial weights
    model = model_class(
        llm=AutoModelForCausalLM.from_pretrained(paths.llm_dir, trust_remote_code=True, attn_implementation=attention),
        visual_encoder=CLIPVisionModel.from_pretrained(paths.clip_dir),
        freeze_llm=True,
        freeze_visual_encoder=True,
        **levers,
    ).train()
    assert type(model.llm).__name__ == "InternLM2ForCausalLM"
    assert (
        type(model.llm.model.layers[0].attention).__name__
        == {"eager": "InternLM2Attention", "sdpa": "InternLM2SdpaAttention"}[attention]
    )
    calls = Counter()
    mlps = {f"llm.{i}": layer.feed_forward for i, layer in enumerate(model.llm.model.layers)}
    mlps["vit.0"] = model.visual_encoder.vision_model.encoder.layers[0].mlp
    for name, mlp in mlps.items():
        # at the call, not its end: a non-reentrant recompute stops once it has what backward needs
        mlp.register_forward_pre_hook(lambda *_, name=name: calls.update([name]))
    model.llm.output.register_forward_pre_hook(lambda _, args: calls.update({"logits": args[0].shape[:-1].numel()}))
    size = model.visual_encoder.config.image_size
    data = {
        "input_ids": torch.tensor([[1, IMAGE_TOKEN_INDEX, 5, 6, 7], [1, IMAGE_TOKEN_INDEX, 8, 9, 2]]),
        "labels": torch.tensor([[-100, -100, 5, 6, 7], [-100, -100, 8, -100, -100]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool),  # the second padded
        "pixel_values": torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1)),
    }
    with during_step():
        loss = model(data, mode="loss")["loss"]
        loss.backward()
    return calls, loss.item(), [p.grad for p in model.projector.parameters()]


def test_model_levers_skip_the_vit_backward_and_the_recompute_of_unchecked_layers(synthetic_layout):
    """The mechanism, counted on InternLM2's own code: stock recomputes every LLM layer
    and the ViT in the backward pass; with the levers the ViT runs once, the unchecked
    last layer runs once, the checkpointed first layer still twice, and the loss and the
    projector's gradients are the same numbers."""
    from xtuner.model import LLaVAModel

    from bench.trainer.levered_llava import LeveredLLaVAModel

    stock_calls, stock_loss, stock_grads = _one_training_step(synthetic_layout, LLaVAModel)
    calls, loss, grads = _one_training_step(
        synthetic_layout, LeveredLLaVAModel, skip_vit_backward=True, unchecked_llm_layers=1
    )
    assert stock_calls["llm.0"] == stock_calls["llm.1"] == stock_calls["vit.0"] == 2
    assert (calls["llm.0"], calls["llm.1"], calls["vit.0"]) == (2, 1, 1)
    assert calls["logits"] == stock_calls["logits"]  # every position
    assert loss == stock_loss
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    assert all((g == s).all() for g, s in zip(grads, stock_grads))


def _op_counter(ops):
    """A dispatch mode that counts the calls of ``ops`` (aten overloads) in its ``counts``."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.counts = Counter()

        def __torch_dispatch__(self, op, types, args=(), kwargs=None):
            if op in ops:
                self.counts[op] += 1
            return op(*args, **(kwargs or {}))

    return CountOps()


def _matmuls_in_backward(layout: Path, **levers) -> tuple[int, float, list]:
    """One training step of the levered model (InternLM2's own code): the linear
    layers' matmuls the backward pass runs (its recomputes' and the gradients'), the
    loss and the projector's gradients."""
    import torch

    from bench.trainer.levered_llava import LeveredLLaVAModel

    matmuls = _op_counter({torch.ops.aten.mm.default, torch.ops.aten.addmm.default})
    original = torch.Tensor.backward

    def counted_backward(tensor, *args, **kwargs):
        with matmuls:
            return original(tensor, *args, **kwargs)

    torch.Tensor.backward = counted_backward
    try:
        _, loss, grads = _one_training_step(layout, LeveredLLaVAModel, skip_vit_backward=True, **levers)
    finally:
        torch.Tensor.backward = original
    return sum(matmuls.counts.values()), loss, grads


def test_selective_layers_recompute_their_attention_but_not_their_mlp(synthetic_layout):
    """A layer that keeps its MLP's gate and up outputs: its backward pass recomputes
    the attention's two linear layers (qkv and output) but not the MLP's, and the loss
    and the projector's gradients are the same numbers as with the layer recomputed
    whole (one selective layer, the other checkpointed) or kept whole (unchecked)."""
    import torch

    one, one_loss, one_grads = _matmuls_in_backward(synthetic_layout, selective_llm_layers=1)
    both, both_loss, both_grads = _matmuls_in_backward(synthetic_layout, selective_llm_layers=2)
    unchecked, unchecked_loss, unchecked_grads = _matmuls_in_backward(synthetic_layout, unchecked_llm_layers=2)
    assert one - both == 2  # the checkpointed layer's gate and up (its down is never recomputed)
    assert both - unchecked == 2 * 2  # each selective layer's qkv and output
    assert one_loss == both_loss == unchecked_loss
    for other in (both_grads, unchecked_grads):
        assert all(g.abs().sum() > 0 and torch.equal(g, s) for g, s in zip(other, one_grads))


def test_labelled_logits_only_computes_the_caption_rows_and_the_same_loss(synthetic_layout):
    """Stock projects every position (image tokens included) to the vocabulary; the
    lever projects the 4 positions that predict the 4 labelled tokens, and the loss
    and the projector's gradients agree with stock's to float32 rounding (a matmul
    of 4 rows sums in another order than one of all rows)."""
    import torch
    from xtuner.model import LLaVAModel

    from bench.trainer.levered_llava import LeveredLLaVAModel

    stock_calls, stock_loss, stock_grads = _one_training_step(synthetic_layout, LLaVAModel)
    calls, loss, grads = _one_training_step(synthetic_layout, LeveredLLaVAModel, labelled_logits_only=True)
    assert calls["logits"] == 4 < stock_calls["logits"]  # 2 x (4 text positions plus the image's)
    assert loss == pytest.approx(stock_loss, rel=1e-6)
    assert all(torch.allclose(g, s, rtol=1e-4, atol=1e-6) for g, s in zip(grads, stock_grads))


def test_sdpa_attention_is_the_same_function_as_internlm2s_eager_attention(synthetic_layout):
    """The attention lever builds the model code's own SDPA class; its loss and the
    projector's gradients agree with the eager attention's to float32 rounding (the
    fused kernel sums the softmax in another order), on a batch with padding."""
    import torch
    from xtuner.model import LLaVAModel

    _, eager_loss, eager_grads = _one_training_step(synthetic_layout, LLaVAModel)
    _, loss, grads = _one_training_step(synthetic_layout, LLaVAModel, attention="sdpa")
    assert loss == pytest.approx(eager_loss, rel=1e-6)
    assert all(torch.allclose(g, s, rtol=1e-4, atol=1e-6) for g, s in zip(grads, eager_grads))


def test_fused_rms_norm_routes_every_llm_norm_and_computes_the_same_numbers(synthetic_layout, monkeypatch):
    """Every RMSNorm of the LLM (two a layer and the final one; the checkpointed layers'
    again in their recompute) normalizes through torch's rms_norm with the lever and
    none without; on CPU torch computes it with the model code's own ops, so the loss
    and the projector's gradients are the same numbers (on CUDA it is one fused kernel:
    tests/gpu/test_gpu.py holds its rounding to the model code's)."""
    import torch
    from xtuner.model import LLaVAModel

    from bench.trainer.levered_llava import LeveredLLaVAModel

    calls = Counter()
    rms_norm = torch.nn.functional.rms_norm
    monkeypatch.setattr(
        torch.nn.functional, "rms_norm", lambda *args, **kwargs: calls.update(["rms_norm"]) or rms_norm(*args, **kwargs)
    )
    _, stock_loss, stock_grads = _one_training_step(synthetic_layout, LLaVAModel)
    assert calls["rms_norm"] == 0
    _, loss, grads = _one_training_step(synthetic_layout, LeveredLLaVAModel, fused_rms_norm=True)
    assert calls["rms_norm"] == 2 * (2 + 2) + 1  # 2 layers, each recomputed once, and the final norm
    assert loss == stock_loss
    assert all(g.abs().sum() > 0 and torch.equal(g, s) for g, s in zip(grads, stock_grads))


def test_triton_kernels_route_the_model_codes_rotary_and_norm_weight_and_give_the_same_fp16_gradient(
    synthetic_layout,
):
    """With the levers the model code's apply_rotary_pos_emb and its norms' weight
    products go through the Triton kernels, here run by Triton's CPU interpreter in fp16
    (its bf16 conversion truncates; tests/gpu/test_gpu.py holds bf16 on CUDA): in a
    checkpointed, a selective and an unchecked layer, the projector's first gradient is
    the same numbers as stock's, and the weight product is torch's, rows and columns
    that fill no whole block included."""
    code = f"""
import torch
from bench.trainer import fused_rotary, kernel_support, norm_weight
from bench.trainer.levered_llava import LeveredLLaVAModel
from tests.bench.trainer.test_model_levers import _first_projector_gradient

kernel_support.KERNEL_DEVICES.add("cpu")
launches = []
rotate, scale_rows = fused_rotary.rotate, norm_weight.scale_rows
fused_rotary.rotate = lambda *args, **kwargs: launches.append(kwargs["backward"]) or rotate(*args, **kwargs)
norm_weight.scale_rows = lambda *args: launches.append("norm") or scale_rows(*args)
layout, half = {str(synthetic_layout)!r}, torch.float16
stock = _first_projector_gradient(layout, "sdpa", half, layers=3)
assert not launches
levers = dict(fused_rotary=True, fused_rms_norm=True, selective_llm_layers=1, unchecked_llm_layers=1)
fused = _first_projector_gradient(layout, "sdpa", half, layers=3, model_class=LeveredLLaVAModel, **levers)
generator = torch.Generator().manual_seed(2)
weight = torch.randn(1500, generator=generator).to(half)
x = torch.randn(3, 7, 1500, generator=generator).to(half)
print(torch.equal(scale_rows(x, weight), weight * x), torch.equal(scale_rows(x[:, ::2], weight), weight * x[:, ::2]))
print(*(launches.count(kind) for kind in (False, True, "norm")), torch.equal(fused, stock), bool(stock.abs().sum() > 0))
"""
    printed = _interpreted(code)
    assert printed[-7:-5] == ["True", "True"], printed  # the products, 1,500 wide
    # rotary: query and key in 3 forwards and 2 recomputes; query and key in 3 backwards.
    # norm weights: 2 a layer in 3 forwards and 2 recomputes, the final norm's, as many backwards
    assert printed[-5:] == ["10", "6", "18", "True", "True"], printed


def test_fused_swiglu_routes_the_model_codes_mlps_and_stays_within_one_rounding(synthetic_layout):
    """With the lever each decoder layer's MLP computes silu(gate) * up in the Triton
    kernels (Triton's CPU interpreter here, in fp16, with numpy's exp for CUDA's): one
    launch a forward, recompute included, and one a backward; at most a thousandth of
    the products and gradients round the other way from the eager ops', each within two
    roundings (an intermediate's, the SiLU's or a product's, and its own), and the
    projector's first gradient is as near the float32 one as stock's."""
    code = _counted_lever_gradients(synthetic_layout, "fused_swiglu", "_launch", fused_swiglu=True)
    code += """
generator = torch.Generator().manual_seed(2)
gate, up, grad = (torch.randn(5, 7, 3000, generator=generator).mul(3).to(half) for _ in range(3))
gate.requires_grad_(), up.requires_grad_()
eager = torch.nn.functional.silu(gate) * up
kernel = fused_swiglu.swiglu(gate, up)
for ours, theirs in zip([kernel, *torch.autograd.grad(kernel, (gate, up), grad)],
                        [eager, *torch.autograd.grad(eager, (gate, up), grad)]):
    apart = ours != theirs
    roundings = 2 * torch.finfo(half).eps * theirs.float().abs() + torch.finfo(half).smallest_normal * 2**-10
    print(float(apart.float().mean()), bool(((ours.float() - theirs.float()).abs() <= roundings).all()))
"""
    printed = _interpreted(code)
    # 3 layers' forwards and 2 recomputes, 3 backwards
    assert printed[:2] == ["5", "3"], printed
    assert float(printed[2]) <= 2, printed
    for share, within in zip(printed[3::2], printed[4::2]):
        assert float(share) <= 1e-3 and within == "True", printed


def test_fused_swiglu_keeps_an_mlps_own_forward_where_it_computes_otherwise(synthetic_layout):
    """The model code's MLP (InternLM2's, SiLU) is routed and then computes the same
    numbers on CPU; with another activation, or a forward with another term, the
    module keeps its own forward and its own projections."""
    import torch
    from transformers import AutoConfig
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    from bench.trainer.fused_swiglu import fuse_swiglu

    folder = str(Layout.at(synthetic_layout).llm_dir)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    mlp_class = get_class_from_dynamic_module("modeling_internlm2.InternLM2MLP", folder)
    x = torch.randn(2, 5, config.hidden_size)
    mlp = mlp_class(config)
    expected = mlp(x)
    assert fuse_swiglu(mlp) and torch.equal(mlp(x), expected)

    config.hidden_act = "gelu"
    other_activation = mlp_class(config)
    projections = dict(other_activation.named_children())

    class OtherTerm(mlp_class):
        def forward(self, x):
            return super().forward(x) + x

    config.hidden_act = "silu"
    assert not fuse_swiglu(other_activation) and not fuse_swiglu(OtherTerm(config))
    assert "forward" not in vars(other_activation) and dict(other_activation.named_children()) == projections


def test_grouped_query_sdpa_routes_the_model_codes_sdpa_attention_and_gives_stocks_gradient(synthetic_layout):
    """With the lever each layer's SDPA attention splits and rotates the packed projection
    in the rotary kernel (Triton's CPU interpreter, fp16): query and key in each forward,
    recompute included, and in each backward; the projector's first gradient is stock
    SDPA's to within SDPA's own order of summing the key and value heads' gradients
    (as near the float32 one as stock's), and the packed projection's gradient is the
    model code's split's, element for element."""
    code = _counted_lever_gradients(synthetic_layout, "grouped_attention", "rotate_into", grouped_query_sdpa=True)
    code += """
generator = torch.Generator().manual_seed(2)
qkv = torch.randn(2, 5, 2 * (3 + 2) * 8, generator=generator).to(half).requires_grad_()
cos, sin = (torch.randn(1, 5, 8, generator=generator).to(half) for _ in range(2))
outputs = grouped_attention.split_rotated(qkv, cos, sin, 3, 8)
kernel_done = [o.detach() for o in outputs], torch.autograd.grad(outputs, qkv, [torch.ones_like(o) for o in outputs])
kernel_support.KERNEL_DEVICES.discard("cpu")
outputs = grouped_attention.split_rotated(qkv, cos, sin, 3, 8)
ops_done = [o.detach() for o in outputs], torch.autograd.grad(outputs, qkv, [torch.ones_like(o) for o in outputs])
print(all(torch.equal(k, o) for k, o in zip(kernel_done[0] + list(kernel_done[1]), ops_done[0] + list(ops_done[1]))))
"""
    printed = _interpreted(code)
    # query and key in 3 layers' forwards and 2 recomputes, and in 3 backwards
    assert printed[:2] == ["10", "6"], printed
    assert float(printed[2]) <= 1.5 and printed[3] == "True", printed


def test_grouped_query_sdpa_keeps_an_attentions_own_forward_where_it_computes_otherwise(synthetic_layout):
    """InternLM2's SDPA attention is routed and computes its own numbers on CPU (float32,
    to rounding); its eager class is not routed, nor a class whose forward computes
    otherwise, nor one with another signature."""
    import torch
    from transformers import AutoConfig
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    from bench.trainer.grouped_attention import fuse_grouped_attention

    folder = str(Layout.at(synthetic_layout).llm_dir)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    sdpa_class = get_class_from_dynamic_module("modeling_internlm2.InternLM2SdpaAttention", folder)
    eager_class = get_class_from_dynamic_module("modeling_internlm2.InternLM2Attention", folder)

    class ScaledSdpaAttention(sdpa_class):
        def forward(self, hidden_states, **kwargs):
            output, weights, cache = super().forward(hidden_states, **kwargs)
            return output * 2, weights, cache

    class OtherSignatureSdpaAttention(sdpa_class):
        def forward(self, hidden_states, positions, **kwargs):
            return super().forward(hidden_states, position_ids=positions, **kwargs)

    hidden = torch.randn(2, 5, config.hidden_size)
    positions = torch.arange(5).expand(2, 5)
    for attention_class, routed in (
        (sdpa_class, True),
        (eager_class, False),
        (ScaledSdpaAttention, False),
        (OtherSignatureSdpaAttention, False),
    ):
        model = torch.nn.ModuleDict({"attention": attention_class(config, layer_idx=0)})
        with torch.no_grad():
            expected = model.attention(hidden, position_ids=positions)[0] if routed else None
        fuse_grouped_attention(model)
        assert ("forward" in vars(model.attention)) == routed, attention_class.__name__
        if routed:
            with torch.no_grad():
                assert torch.allclose(model.attention(hidden, position_ids=positions)[0], expected, atol=1e-6)


def test_rotary_once_computes_cos_and_sin_once_a_step_and_the_same_numbers(synthetic_layout):
    """With the lever the rotary cos and sin are computed once a training step, where the
    model code computes them in each layer's forward and recompute (counted by the
    cosines taken, eager and grouped-query SDPA attention alike), with one read of the
    positions' maximum back from the device (the dynamic-NTK module's), and the loss and
    the projector's gradients are the same numbers."""
    import torch

    from bench.trainer.levered_llava import LeveredLLaVAModel

    cos, read_back = torch.ops.aten.cos.default, torch.ops.aten._local_scalar_dense.default
    # 2 layers: the first checkpointed (its attention recomputed), the second unchecked
    levers = dict(skip_vit_backward=True, selective_llm_layers=1, unchecked_llm_layers=1)
    for attention, attention_levers in (("eager", {}), ("sdpa", {"grouped_query_sdpa": True})):
        results = {}
        for once in (False, True):
            mode = _op_counter({cos, read_back})
            _, loss, grads = _one_training_step(
                synthetic_layout,
                LeveredLLaVAModel,
                attention,
                lambda: mode,
                rotary_once=once,
                **levers,
                **attention_levers,
            )
            results[once] = mode.counts, loss, grads
        (counts, loss, grads), (once_counts, once_loss, once_grads) = results[False], results[True]
        assert (counts[cos], once_counts[cos]) == (3, 1), attention
        assert counts[read_back] - once_counts[read_back] == 2, attention
        assert once_loss == loss
        assert all(torch.equal(a, b) for a, b in zip(once_grads, grads))


def _counted_lever_gradients(layout: Path, module: str, launch: str, **lever) -> str:
    """Code for ``_interpreted`` that runs the kernels on CPU, counts the calls of
    ``bench.trainer.<module>.<launch>`` by their ``backward`` argument (``launches``),
    and prints the forwards' and backwards' counts and how far the lever's first
    projector gradient in fp16 is from the float32 one, as a share of stock's distance
    (3 layers: a checkpointed, a selective and an unchecked one)."""
    return f"""
import torch
from bench.trainer import kernel_support, {module}
from bench.trainer.levered_llava import LeveredLLaVAModel
from tests.bench.trainer.test_model_levers import _first_projector_gradient

kernel_support.KERNEL_DEVICES.add("cpu")
launches = []
counted = {module}.{launch}
{module}.{launch} = lambda *args, **kwargs: launches.append(kwargs["backward"]) or counted(*args, **kwargs)
layout, half = {str(layout)!r}, torch.float16
exact = _first_projector_gradient(layout, "sdpa", torch.float32, layers=3)
stock = _first_projector_gradient(layout, "sdpa", half, layers=3)
levers = dict(**{lever!r}, selective_llm_layers=1, unchecked_llm_layers=1)
fused = _first_projector_gradient(layout, "sdpa", half, layers=3, model_class=LeveredLLaVAModel, **levers)
print(launches.count(False), launches.count(True), float((fused - exact).norm() / (stock - exact).norm()))
"""


def _interpreted(code: str) -> list[str]:
    """What ``code`` prints, run in a fresh interpreter under Triton's CPU interpreter."""
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "TRITON_INTERPRET": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.split()


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_fused_rotary_kernel_is_compiled_for_the_gpu_without_fused_multiply_adds(dtype):
    """The kernel built for an H100/H200 (sm_90; Triton compiles without a GPU) with the
    launch's options: every product and sum its own instruction, each rounding to the
    16-bit type as an eager op does; Triton's default build contracts a product and the
    sum into one FMA (one rounding), which is what the H200 showed differing."""
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from bench.trainer.fused_rotary import _kernel
    from bench.trainer.kernel_support import COMPILE_OPTIONS

    pointers = {name: f"*{dtype}" for name in ("x_ptr", "cos_ptr", "sin_ptr", "out_ptr")}
    strides = ("xb", "xk", "xg", "xs", "ob", "ok", "og", "os", "cb", "cs")
    integers = (*strides, "rows", "heads", "group", "positions", "size")
    signature = {
        **pointers,
        **dict.fromkeys(integers, "i32"),
        **dict.fromkeys(("ROWS", "SIZE", "BACKWARD"), "constexpr"),
    }

    def fused_multiply_adds(backward: bool, options: dict) -> int:
        source = ASTSource(_kernel(), signature, constexprs={"ROWS": 16, "SIZE": 128, "BACKWARD": backward})
        ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]
        return len(re.findall(r"\b(?:fma|mad)\.rn[.a-z0-9]*\.(?:f16|bf16|f32)", ptx))

    assert fused_multiply_adds(False, COMPILE_OPTIONS) == fused_multiply_adds(True, COMPILE_OPTIONS) == 0
    assert fused_multiply_adds(False, {}) > 0  # the default build fuses the forward's: this check can fail


def test_fused_rotary_keeps_a_model_codes_own_function_where_it_computes_otherwise():
    """Another revision's convention (cos indexed by position_ids) is not this kernel's:
    its function stays."""
    import torch

    from bench.trainer.fused_rotary import _computes_the_same, rotated_by_ops

    def indexed_by_positions(q, k, cos, sin, position_ids, unsqueeze_dim=1):
        cos, sin = cos[position_ids], sin[position_ids]
        return rotated_by_ops(q, cos[:, 0], sin[:, 0]), rotated_by_ops(k, cos[:, 0], sin[:, 0])

    assert _computes_the_same(lambda q, k, cos, sin, *_: (rotated_by_ops(q, cos, sin), rotated_by_ops(k, cos, sin)))
    assert not _computes_the_same(indexed_by_positions)
    assert not _computes_the_same(lambda q, k, cos, sin, *_: (rotated_by_ops(q, cos, sin), k))
    assert rotated_by_ops(torch.ones(1, 1, 1, 2), torch.ones(1, 1, 2), torch.zeros(1, 1, 2)).sum() == 2


def test_model_levers_keep_the_loss_curve(synthetic_layout, tmp_path):
    """Two real CPU runs, stock and every model lever: the same losses (to float32
    rounding, which the labelled-only logits and SDPA change)."""
    curves = []
    model_levers = [
        *("--skip-vit-backward", "--unchecked-llm-layers", "1", "--selective-llm-layers", "1"),
        *("--labelled-logits-only", "--sdpa-attention", "--fused-rms-norm", "--fused-rotary", "--fused-swiglu"),
        *("--grouped-query-sdpa", "--rotary-once"),
    ]
    for levers in (["--stock"], model_levers):
        done = short_cpu_run(synthetic_layout, tmp_path, *levers)
        assert done.returncode == 0, done.stderr[-3000:]
        verdict = json.loads(done.stdout)
        curves.append([point["loss"] for point in verdict["result"]["curve"]])
    levers = verdict["recipe"]["levers"]
    assert levers["skip_vit_backward"] and levers["unchecked_llm_layers"] == levers["selective_llm_layers"] == 1
    assert levers["labelled_logits_only"]
    assert levers["sdpa_attention"] and levers["fused_rms_norm"] and levers["fused_rotary"] and levers["fused_swiglu"]
    assert levers["grouped_query_sdpa"] and levers["rotary_once"]
    assert curves[1] == pytest.approx(curves[0], rel=1e-5)


def _first_projector_gradient(
    layout: Path, attention: str, dtype, layers: int = 16, hidden: int = 256, model_class=None, **levers
):
    """The projector's gradient of one forward and backward in ``dtype``: InternLM2's own
    code, ``layers`` deep at width ``hidden`` with random weights (std 0.02), on a padded
    batch of 4 with 48 tokens each; the same weights and batch for every call; XTuner's
    LLaVAModel unless ``model_class`` (with ``levers``)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, CLIPVisionModel
    from xtuner.model import LLaVAModel
    from xtuner.utils import IMAGE_TOKEN_INDEX

    paths = Layout.at(layout)
    config = AutoConfig.from_pretrained(paths.llm_dir, trust_remote_code=True)
    config.num_hidden_layers, config.hidden_size, config.intermediate_size = layers, hidden, hidden * 8 // 3
    config.num_attention_heads, config.num_key_value_heads, config.attn_implementation = (
        hidden // 32,
        hidden // 128,
        attention,
    )
    llm = AutoModelForCausalLM.from_config(config, trust_remote_code=True, attn_implementation=attention)
    torch.manual_seed(7)
    for _, parameter in sorted(llm.named_parameters()):
        torch.nn.init.normal_(parameter, std=0.02) if parameter.dim() == 2 else torch.nn.init.ones_(parameter)
    torch.manual_seed(0)  # the projector's initial weights
    model = (
        (model_class or LLaVAModel)(
            llm=llm,
            visual_encoder=CLIPVisionModel.from_pretrained(paths.clip_dir),
            freeze_llm=True,
            freeze_visual_encoder=True,
            **levers,
        )
        .train()
        .to(dtype)
    )
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, config.vocab_size - 1, (4, 48), generator=generator)
    ids[:, 0], ids[:, 1] = 1, IMAGE_TOKEN_INDEX
    labels, mask = ids.clone(), torch.ones(4, 48, dtype=torch.bool)
    labels[:, :2], labels[1, 30:], mask[1, 30:] = -100, -100, False  # the second sample padded
    size = model.visual_encoder.config.image_size
    pixels = torch.randn(4, 3, size, size, generator=generator).to(dtype)
    model({"input_ids": ids, "labels": labels, "attention_mask": mask, "pixel_values": pixels}, mode="loss")[
        "loss"
    ].backward()
    return torch.cat([p.grad.double().flatten() for p in model.projector.parameters()])


def test_sdpa_in_half_precision_is_as_near_the_exact_gradient_as_eager_attention(synthetic_layout):
    """In fp16 and bf16 eager and SDPA attention round differently, and their first
    projector gradients differ by about as much as each differs from the exact (float64)
    one; so a half-precision difference from stock alone cannot tell rounding from a
    changed function. Held against the exact gradient, SDPA is no farther from it than
    stock's eager attention: the same function (in float64 they agree to eager's float32
    softmax), rounded in another order. A lever that changed the function would be far
    outside."""
    import torch

    exact = _first_projector_gradient(synthetic_layout, "sdpa", torch.float64)
    distance = lambda gradient: float((gradient - exact).norm() / exact.norm())  # noqa: E731
    assert distance(_first_projector_gradient(synthetic_layout, "eager", torch.float64)) < 1e-6
    for dtype in (torch.float16, torch.bfloat16):
        eager, sdpa = (distance(_first_projector_gradient(synthetic_layout, a, dtype)) for a in ("eager", "sdpa"))
        assert 0 < sdpa < 1.5 * eager, (dtype, sdpa, eager)
