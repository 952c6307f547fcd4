"""The GPU path: torchrun + DeepSpeed ZeRO-2 on every visible GPU, NF4 and bf16.

Needs CUDA, so CI (no GPU) deselects it; run it with `make test-gpu` on a GPU
machine. The layout is the synthetic one; the models are tiny and random.
"""

from __future__ import annotations

import json

import pytest

from bench.synth.spec import DEMO_PER_DEVICE_BATCH
from bench.verdict import document as verdict_mod
from tests.conftest import llava_bench, spawn_run

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("precision", ["nf4", "bf16"])
def test_torchrun_deepspeed_zero2_run_on_all_gpus(synthetic_layout, tmp_path, precision):
    import torch

    gpus = torch.cuda.device_count()
    assert gpus >= 1, "no CUDA GPU visible"
    done = spawn_run(
        synthetic_layout,
        tmp_path,
        "--device",
        "cuda",
        "--precision",
        precision,
        "--per-device-batch",
        str(DEMO_PER_DEVICE_BATCH),
        "--global-batch",
        str(DEMO_PER_DEVICE_BATCH * gpus),
        "--max-steps",
        "60",
        "--target-loss",
        # below the untrained projector's first logged loss (about 0.65 on CPU), above where 60 steps end
        "0.4",
        "--json",
    )
    print(done.stderr[-3000:])
    verdict = json.loads(done.stdout)
    verdict_mod.validate(verdict)
    print(
        json.dumps(
            {
                k: verdict[k]
                for k in (
                    "status",
                    "reason",
                    "termination",
                    "throughput",
                    "baseline",
                    "interconnect",
                    "environment",
                    "timing",
                )
            }
        )
    )
    print(json.dumps(verdict["recipe"]), json.dumps(verdict["topology"]["launch_command"]))
    assert verdict["status"] == "pass", verdict["reason"]
    assert verdict["termination"]["kind"] == "completed", verdict["termination"]
    assert verdict["world_size"] == gpus
    assert verdict["recipe"]["precision"] == precision
    assert "--deepspeed" in verdict["topology"]["launch_command"]
    interconnect = verdict["interconnect"]
    if gpus == 1:  # a lone process has no peer to reach: no collective check
        assert interconnect is None and "interconnect_seconds" not in verdict["timing"]["startup"]
    else:
        assert interconnect["backend"] == "nccl" and interconnect["world_size"] == gpus
        assert [p["local_rank"] for p in interconnect["placement"]] == list(range(gpus))
        assert interconnect["allreduce"]["bus_bandwidth_gbps"] > 0
    inventory = verdict["environment"]["gpus"]
    assert len(inventory) == gpus and all(g["name"] and g["memory_mib"] > 0 for g in inventory)
    assert verdict["environment"]["software"]["nccl"]
    throughput = verdict["throughput"]
    assert throughput["flops_per_step"] > 0
    assert (throughput["mfu"] is None) == (throughput["flop_model"]["peak_tflops_per_device"] is None)
    assert verdict["baseline"]["speedup_vs_seed_a100"] is None  # tiny models: no comparison with the seed's 20B run
    assert "not InternLM2-20B" in verdict["baseline"]["why_null"]
    assert (tmp_path / verdict["run_id"] / "report.md").is_file()
    assert verdict["throughput"]["peak_memory_mib"] > 0
    losses = [point["loss"] for point in verdict["result"]["curve"]]
    assert losses[-1] < losses[0]
    rank_logs = list((tmp_path / verdict["run_id"] / "logs" / "node-0" / "ranks").rglob("stderr.log"))
    assert len(rank_logs) == gpus, rank_logs


def test_perf_compares_stock_nf4_with_the_default_and_the_training_agrees(synthetic_layout, tmp_path):
    """`llava-bench perf` on the GPU machine: the float32 reference, stock NF4 and the
    default levers, InternLM2's own code with SDPA attention. Tiny models, so the times
    say nothing about the 20B run; the loss curves must agree with stock's, and the
    projector's first gradient and its weights after the compared steps must be no
    farther from the float32 run's than twice stock's own half-precision rounding
    (a zeroed gradient is at 100 %, tests/entrypoint/tools/test_perf.py)."""
    done = llava_bench(
        "perf",
        "--root",
        str(synthetic_layout),
        "--out",
        str(tmp_path),
        "--device",
        "cuda",
        "--steps",
        "20",
        "--per-device-batch",
        str(DEMO_PER_DEVICE_BATCH),
        "--precision",
        "nf4",
        "--variant",
        "exact",
        "--variant",
        "stock",
        "--variant",
        "default",
        "--json",
    )
    print(done.stderr[-2000:])
    rows = {row["variant"]: row for row in json.loads(done.stdout)}
    print(json.dumps(rows, indent=1))
    report = json.loads((tmp_path / "perf.json").read_text())
    assert (report["projector_reference"], report["projector_allowance_from"]) == ("exact", "stock")
    assert report["projector_movement"] > 1e-3  # the learning rate moved the projector in the compared steps
    default = rows["default"]
    assert default["levers"]["dequantize_nf4"] and default["levers"]["sdpa_attention"]
    assert default["levers"]["unchecked_llm_layers"] > 0 and default["levers"]["dataloader_workers"] == 4
    assert default["llm_architecture"] == "InternLM2ForCausalLM"
    assert rows["stock"]["gradient_difference"] > 0  # half precision is not float32: the allowance is measured
    for row in rows.values():
        assert row["termination"] == "completed"
        assert row["gradient_agrees"] is True, row
        # measured 2026-12-01: stock's weights 0.566 of their move from exact's, default 0.568; twice
        # stock's exceeds an untrained projector's 1.0, so that check cannot tell (None), and never fails
        assert row["projector_agrees"] is not False, row
    for row in (rows["stock"], default):
        assert row["times_limit"] > 1  # slower than the card's measured matmul rate allows
        assert row["max_loss_difference"] < 0.01, row


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
def test_fused_rms_norm_runs_fewer_kernels_and_rounds_as_the_model_code(synthetic_layout, dtype_name):
    """The fused-norm lever on CUDA, on the model code's own RMSNorm class at the 20B
    width: torch's rms_norm runs as a fused kernel each way, so forward and backward
    launch under half the model code's kernels; its output is the model code's but
    where the fp32 sum, taken in another order, rounds across a 16-bit boundary (at most
    a thousandth of the elements, each within two roundings), and its input gradient
    is within one rounding of the model code's on average."""
    import copy

    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    from bench.core.layout import Layout
    from bench.core.shapes import INTERNLM2_20B
    from bench.trainer.levered_llava import fuse_rms_norms

    dtype = getattr(torch, dtype_name)
    norm_class = get_class_from_dynamic_module(
        "modeling_internlm2.InternLM2RMSNorm", str(Layout.at(synthetic_layout).llm_dir)
    )
    eager = norm_class(INTERNLM2_20B.hidden, eps=1e-5).to("cuda", dtype)
    torch.nn.init.normal_(eager.weight.requires_grad_(False), 1.0, 0.1)  # frozen, as in training
    fused = copy.deepcopy(eager)
    fuse_rms_norms(fused)
    generator = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(8, 1024, INTERNLM2_20B.hidden, device="cuda", dtype=dtype, generator=generator)
    x.requires_grad_()
    grad = torch.randn(x.shape, device="cuda", dtype=dtype, generator=generator)

    def forward_and_backward(norm):
        x.grad = None
        norm(x).backward(grad)  # kernels chosen, caches warm
        x.grad = None
        with profile(activities=[ProfilerActivity.CUDA]) as profiled:
            out = norm(x)
            out.backward(grad)
            torch.cuda.synchronize()
        kernels = sum(1 for event in profiled.events() if event.device_type == DeviceType.CUDA)
        return out.detach(), x.grad.clone(), kernels

    eager_out, eager_grad, eager_kernels = forward_and_backward(eager)
    fused_out, fused_grad, fused_kernels = forward_and_backward(fused)
    print(dtype_name, {"eager kernels": eager_kernels, "fused kernels": fused_kernels})
    assert fused_kernels < eager_kernels / 2
    rounding = torch.finfo(dtype).eps
    assert (fused_out != eager_out).float().mean().item() <= 1e-3
    assert ((fused_out - eager_out).abs() <= 2 * rounding * eager_out.abs()).all()
    assert ((fused_grad - eager_grad).float().norm() / eager_grad.float().norm()).item() < rounding


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
def test_fused_rotary_runs_fewer_kernels_and_gives_the_model_codes_numbers(synthetic_layout, dtype_name):
    """The fused-rotary lever on CUDA, with the model code's own apply_rotary_pos_emb and
    rotary embedding at the 20B shapes (the query's 48 heads a strided view of the
    packed projection, as the attention makes it, and the key's 8): one kernel for each
    of query and key a forward and one a backward, where the model code launches about
    ten each way; the outputs and the input gradients are the same numbers."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    from bench.core.layout import Layout
    from bench.core.shapes import INTERNLM2_20B
    from bench.trainer.fused_rotary import fused_apply_rotary_pos_emb

    dtype = getattr(torch, dtype_name)
    folder = str(Layout.at(synthetic_layout).llm_dir)
    original = get_class_from_dynamic_module("modeling_internlm2.apply_rotary_pos_emb", folder)
    rotary = get_class_from_dynamic_module("modeling_internlm2.InternLM2RotaryEmbedding", folder)
    heads, kv_heads, batch, positions = INTERNLM2_20B.heads, INTERNLM2_20B.kv_heads, 8, 1024
    size = INTERNLM2_20B.hidden // heads
    generator = torch.Generator("cuda").manual_seed(0)
    packed = torch.randn(batch, positions, kv_heads, heads // kv_heads + 2, size, device="cuda", generator=generator)
    packed = packed.to(dtype).requires_grad_()
    position_ids = torch.arange(positions, device="cuda")[None]
    cos, sin = rotary(size, max_position_embeddings=32768, base=1000000, device="cuda")(packed, position_ids)
    grads = [
        torch.randn(batch, n, positions, size, device="cuda", generator=generator).to(dtype) for n in (heads, kv_heads)
    ]

    def forward_and_backward(apply):
        def once():
            packed.grad = None
            query = packed[..., : heads // kv_heads, :].reshape(batch, positions, heads, size).transpose(1, 2)
            key = packed[..., -2, :].transpose(1, 2)
            outs = apply(query, key, cos, sin)
            torch.autograd.backward(outs, grads)
            return outs

        once()  # compiled, caches warm
        with profile(activities=[ProfilerActivity.CUDA]) as profiled:
            outs = once()
            torch.cuda.synchronize()
        kernels = sum(1 for event in profiled.events() if event.device_type == DeviceType.CUDA)
        return [out.detach() for out in outs], packed.grad.clone(), kernels

    eager_outs, eager_grad, eager_kernels = forward_and_backward(original)
    fused_outs, fused_grad, fused_kernels = forward_and_backward(
        lambda *args: fused_apply_rotary_pos_emb(original, *args)
    )
    print(dtype_name, {"eager kernels": eager_kernels, "fused kernels": fused_kernels})
    assert fused_kernels < eager_kernels / 2
    assert all(torch.equal(fused, eager) for fused, eager in zip(fused_outs, eager_outs))
    assert torch.equal(fused_grad, eager_grad) and eager_grad.abs().sum() > 0


def _milliseconds(work, repeats: int) -> float:
    """``work``'s mean CUDA time over ``repeats`` calls, after one (compiled, caches warm)."""
    import torch

    work()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        work()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
def test_norm_weight_kernel_gives_torchs_products_forward_and_backward(dtype_name):
    """The fused-norm lever's weight product on CUDA at the 20B width and batch 32 x 604
    positions: its output and its input gradient are torch's broadcast product's, the
    same numbers; both products' times are printed (the step's share is perf's)."""
    import torch

    from bench.core.shapes import INTERNLM2_20B
    from bench.trainer.norm_weight import weight_product

    dtype = getattr(torch, dtype_name)
    generator = torch.Generator("cuda").manual_seed(0)
    weight = (1 + 0.1 * torch.randn(INTERNLM2_20B.hidden, device="cuda", generator=generator)).to(dtype)
    x = torch.randn(32, 604, INTERNLM2_20B.hidden, device="cuda", generator=generator).to(dtype).requires_grad_()
    grad = torch.randn(x.shape, device="cuda", generator=generator).to(dtype)

    def forward_and_backward(product):
        x.grad = None
        out = product(weight, x)
        out.backward(grad)
        return out.detach(), x.grad.clone()

    eager_out, eager_grad = forward_and_backward(torch.mul)
    fused_out, fused_grad = forward_and_backward(weight_product)
    times = {name: _milliseconds(lambda: forward_and_backward(product), 20) for name, product in
             (("eager ms", torch.mul), ("kernel ms", weight_product))}  # fmt: skip
    print(dtype_name, times)
    assert torch.equal(fused_out, eager_out) and torch.equal(fused_grad, eager_grad)
    assert not torch.equal(eager_out, x.detach())  # the weight is not ones: the products round


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
def test_fused_swiglu_runs_fewer_kernels_within_two_roundings_of_the_eager_ops(dtype_name):
    """The fused-SwiGLU lever on CUDA at the 20B MLP width: one kernel a forward and one a
    backward where the eager ops launch five; the share of the product's and of the two
    input gradients' elements that differ from the eager ops' (printed: none where
    CUDA's expf and the multiply-add are matched) is at most a thousandth, each within
    two roundings (an intermediate's and its own)."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from bench.core.shapes import INTERNLM2_20B
    from bench.trainer.fused_swiglu import swiglu

    dtype = getattr(torch, dtype_name)
    generator = torch.Generator("cuda").manual_seed(0)
    shape = (8, 1024, INTERNLM2_20B.ffn)
    gate, up, grad = (torch.randn(shape, device="cuda", generator=generator).mul(3).to(dtype) for _ in range(3))
    gate.requires_grad_(), up.requires_grad_()

    def forward_and_backward(function):
        function(gate, up).backward(grad)  # compiled, caches warm
        with profile(activities=[ProfilerActivity.CUDA]) as profiled:
            out = function(gate, up)
            gate.grad = up.grad = None
            out.backward(grad)
            torch.cuda.synchronize()
        kernels = sum(1 for event in profiled.events() if event.device_type == DeviceType.CUDA)
        return [out.detach(), gate.grad.clone(), up.grad.clone()], kernels

    eager, eager_kernels = forward_and_backward(lambda g, u: torch.nn.functional.silu(g) * u)
    fused, fused_kernels = forward_and_backward(swiglu)
    shares = [(ours != theirs).float().mean().item() for ours, theirs in zip(fused, eager)]
    print(dtype_name, {"eager kernels": eager_kernels, "fused kernels": fused_kernels, "elements apart": shares})
    assert fused_kernels < eager_kernels / 2
    finfo = torch.finfo(dtype)
    for ours, theirs, share in zip(fused, eager, shares):
        roundings = 2 * finfo.eps * theirs.float().abs() + finfo.smallest_normal * finfo.eps
        assert share <= 1e-3 and ((ours.float() - theirs.float()).abs() <= roundings).all()


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
def test_grouped_query_sdpa_is_the_model_codes_attention_with_fewer_copies(synthetic_layout, dtype_name):
    """The grouped-query-SDPA lever on CUDA: InternLM2's SDPA attention at the 20B width
    (48 query heads, 8 key-value heads) on batch 32 x 604 positions with padding, its
    own forward against the routed one, forward and backward: fewer copy and fill
    kernels, the output and the hidden states' gradient within a ten-thousandth
    (relative norm; SDPA sums the key and value heads' gradients in another order);
    whether the output's bits are the same and both times are printed."""
    import copy

    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoConfig
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    from bench.core.layout import Layout
    from bench.core.shapes import INTERNLM2_20B
    from bench.trainer.grouped_attention import fuse_grouped_attention

    dtype = getattr(torch, dtype_name)
    folder = str(Layout.at(synthetic_layout).llm_dir)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    config.hidden_size, config.num_attention_heads = INTERNLM2_20B.hidden, INTERNLM2_20B.heads
    config.num_key_value_heads = INTERNLM2_20B.kv_heads
    attention_class = get_class_from_dynamic_module("modeling_internlm2.InternLM2SdpaAttention", folder)
    torch.manual_seed(0)
    own = attention_class(config, layer_idx=0).to("cuda", dtype)
    for parameter in own.parameters():
        torch.nn.init.normal_(parameter, std=0.02)
    routed = torch.nn.ModuleDict({"attention": copy.deepcopy(own)})
    fuse_grouped_attention(routed)
    assert "forward" in vars(routed.attention)

    batch, positions = 32, 604
    generator = torch.Generator("cuda").manual_seed(0)
    hidden = torch.randn(batch, positions, config.hidden_size, device="cuda", generator=generator).to(dtype)
    hidden.requires_grad_()
    grad = torch.randn(hidden.shape, device="cuda", generator=generator).to(dtype)
    lengths = torch.randint(540, positions + 1, (batch,), device="cuda", generator=generator)
    keep = torch.arange(positions, device="cuda")[None, :] < lengths[:, None]
    allowed = torch.ones(positions, positions, dtype=torch.bool, device="cuda").tril() & keep[:, None, None, :]
    mask = torch.zeros(allowed.shape, device="cuda", dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    arguments = dict(attention_mask=mask, position_ids=torch.arange(positions, device="cuda").expand(batch, -1))

    def forward_and_backward(attention):
        hidden.grad = None
        out = attention(hidden, **arguments)[0]
        out.backward(grad)
        return out.detach(), hidden.grad.clone()

    def measured(attention):
        forward_and_backward(attention)  # compiled, caches warm
        with profile(activities=[ProfilerActivity.CUDA]) as profiled:
            out, hidden_grad = forward_and_backward(attention)
            torch.cuda.synchronize()
        names = [event.name.lower() for event in profiled.events() if event.device_type == DeviceType.CUDA]
        copies = sum(1 for name in names if "copy" in name or "fill" in name)
        return out, hidden_grad, copies, _milliseconds(lambda: forward_and_backward(attention), 10)

    own_out, own_grad, own_copies, own_ms = measured(own)
    out, hidden_grad, copies, ms = measured(routed.attention)
    apart = [float((ours.float() - theirs.float()).norm() / theirs.float().norm()) for ours, theirs in
             ((out, own_out), (hidden_grad, own_grad))]  # fmt: skip
    print(dtype_name, {"model code ms": own_ms, "grouped ms": ms, "copies and fills": (own_copies, copies),
                       "output bits the same": torch.equal(out, own_out), "apart": apart})  # fmt: skip
    assert copies < own_copies
    assert max(apart) <= 1e-4 and own_grad.abs().sum() > 0


def test_rotary_once_leaves_one_synchronization_a_forward_and_the_model_codes_numbers(synthetic_layout):
    """The rotary-once lever on CUDA, the tiny layout's InternLM2 (dynamic-NTK rotary) in
    bf16, forward and backward: the model code reads the positions' maximum back from
    the GPU in every layer (a synchronization, counted by torch's sync debug mode), the
    shared module once a forward; the logits and the input embeddings' gradient are the
    same bits."""
    import warnings

    import torch
    from transformers import AutoModelForCausalLM

    from bench.core.layout import Layout
    from bench.trainer.rotary_once import share_rotary

    def built():
        llm = AutoModelForCausalLM.from_pretrained(Layout.at(synthetic_layout).llm_dir, trust_remote_code=True)
        return llm.to("cuda", torch.bfloat16).train()

    own, shared = built(), built()
    share_rotary(shared)
    input_ids = torch.randint(3, 100, (4, 64), device="cuda", generator=torch.Generator("cuda").manual_seed(0))

    def step(llm):
        embeddings = llm.get_input_embeddings()(input_ids).detach().requires_grad_()
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                logits = llm(inputs_embeds=embeddings, use_cache=False).logits
                logits.float().square().mean().backward()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = sum(1 for warning in caught if "synchroniz" in str(warning.message))
        return syncs, logits.detach(), embeddings.grad

    for llm in (own, shared):  # the process's first CUDA steps synchronize for their own set-up: not counted
        step(llm)
    own_syncs, own_logits, own_grad = step(own)
    syncs, logits, grad = step(shared)
    layers = len(own.model.layers)
    print({"synchronizations": (own_syncs, syncs), "layers": layers})
    assert own_syncs - syncs == layers - 1
    assert torch.equal(logits, own_logits) and torch.equal(grad, own_grad) and grad.abs().sum() > 0


def test_dequantized_nf4_loading_on_the_gpu_holds_transformers_nf4_values(synthetic_layout):
    """The dequantize-NF4 lever's loader (the checkpoint read onto the GPU, converted and
    quantized there) against transformers' own NF4 loading with each 4-bit linear
    dequantized: every parameter and buffer the same numbers, in the same dtype."""
    import bitsandbytes as bnb
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from bench.core.layout import Layout
    from bench.trainer.dequantize import from_pretrained_dequantized

    nf4 = dict(  # the rendered config's
        load_in_4bit=True,
        llm_int8_threshold=6.0,
        llm_int8_has_fp16_weight=False,
        bnb_4bit_compute_dtype=torch.float16,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_quant_type="nf4",
    )
    kwargs = dict(
        pretrained_model_name_or_path=str(Layout.at(synthetic_layout).llm_dir),
        trust_remote_code=True,
        torch_dtype=torch.float16,
        attn_implementation="sdpa",
    )
    loaded = from_pretrained_dequantized(quantization_config=BitsAndBytesConfig(**nf4), **kwargs)
    reference = AutoModelForCausalLM.from_pretrained(**kwargs, quantization_config=BitsAndBytesConfig(**nf4))
    four_bit = {name: module for name, module in reference.named_modules() if isinstance(module, bnb.nn.Linear4bit)}
    assert len(four_bit) == 5 * reference.config.num_hidden_layers  # wqkv, wo, w1, w2, w3; the output head stays
    expected = {
        **{name: tensor for name, tensor in reference.named_parameters()},
        **{name: tensor for name, tensor in reference.named_buffers()},
        **{
            f"{name}.weight": bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            for name, module in four_bit.items()
        },
    }
    got = {**dict(loaded.named_parameters()), **dict(loaded.named_buffers())}
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and got[name].device == tensor.device, name
        assert torch.equal(got[name], tensor), name
    assert all(type(loaded.get_submodule(name)) is torch.nn.Linear for name in four_bit)
