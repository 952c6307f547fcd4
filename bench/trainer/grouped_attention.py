"""The grouped-query-SDPA lever: InternLM2's SDPA attention from its packed projection
without the copies the model code makes.

The model code's SDPA attention splits the packed qkv projection (for each key-value
head: its query heads, the key, the value) with views, regroups the query heads into
a new tensor, rotates query and key, copies each key and value head once for each of
its query heads (``repeat_kv``), makes all three contiguous (a workaround for a torch
2.1 bug) and runs SDPA; the backward pass sums the copies' gradients back, and each
of the three slices' gradients takes a zero-filled tensor of the projection's size,
then added up. Here one Triton kernel reads the projection's query heads and writes
them rotated in SDPA's (batch, positions, heads, head size) layout, one the key's,
the value is copied once, SDPA runs grouped (``enable_gqa``: each key and value head
read for its group's query heads), and the backward pass writes the projection's
gradient whole, with no fill. The rotation is fused_rotary's kernel, rounded as the
model code's eager ops round; the split moves values without arithmetic; SDPA computes
the same attention, its backward summing a key or value head's gradients over its
query heads itself (one layer on an H200, 2026-12-04: the same output bits, input
gradients 6e-6 apart; docs/PERFORMANCE.md).

Routed only where the module's class computes what ``grouped_attention`` computes
(``_computes_the_same``, on a small instance of that class); 16-bit CUDA tensors take
the kernels, anything else (CPU, the float32 reference) the same function in torch ops.
"""

from __future__ import annotations

import copy
import functools

import torch

from bench.trainer.fused_rotary import rotate_into, rotated_by_ops
from bench.trainer.kernel_support import last_dim_dense, takes_kernel


def fuse_grouped_attention(llm: torch.nn.Module) -> None:
    """Route each SDPA attention of ``llm`` with a packed ``wqkv`` projection
    (InternLM2's) through ``grouped_attention``, where its class computes the same."""
    same_by_class: dict[type, bool] = {}
    for module in llm.modules():
        if not (type(module).__name__.endswith("SdpaAttention") and hasattr(module, "wqkv")):
            continue
        if type(module) not in same_by_class:
            same_by_class[type(module)] = _computes_the_same(module)
        if same_by_class[type(module)]:
            module.forward = functools.partial(grouped_attention, module)


def grouped_attention(
    attention, hidden_states, attention_mask=None, position_ids=None, past_key_value=None,
    output_attentions=False, use_cache=False, cache_position=None, **kwargs,
):  # fmt: skip
    """The model code's SDPA attention forward (the same arguments and results) for
    training: with a cache (generation) or attention weights asked for, its own."""
    if output_attentions or past_key_value is not None:
        return type(attention).forward(
            attention, hidden_states, attention_mask, position_ids, past_key_value,
            output_attentions, use_cache, cache_position, **kwargs,
        )  # fmt: skip
    batch, positions, _ = hidden_states.shape
    qkv = attention.wqkv(hidden_states)
    cos, sin = attention.rotary_emb(qkv, position_ids)  # it reads only the dtype and device of its first argument
    query, key, value = split_rotated(qkv, cos, sin, attention.num_key_value_groups, attention.head_dim)
    mask = None if attention_mask is None else attention_mask[:, :, :, :positions]
    output = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, is_causal=mask is None and positions > 1, enable_gqa=True
    )
    return attention.wo(output.transpose(1, 2).reshape(batch, positions, -1)), None, past_key_value


def split_rotated(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, group: int, size: int):
    """From the packed projection (batch, positions, key-value heads x (group + 2) x
    size): the query (batch, heads, positions, size) and key rotated by cos and sin
    (batch or 1, positions, size), and the value (batch, key-value heads, positions,
    size); in the kernels where they fit them, else as views and torch ops."""
    batch, positions, _ = qkv.shape
    if (
        takes_kernel(qkv)
        and qkv.dtype == cos.dtype == sin.dtype
        and cos.shape == sin.shape
        and cos.shape[0] in (1, batch)
        and cos.shape[1:] == (positions, size)
        and size % 2 == 0
    ):
        return SplitRotated.apply(qkv, cos, sin, group, size)
    packed = _by_head(qkv, group, size)
    query, key, value = packed[:, :, :group].flatten(1, 2), packed[:, :, group], packed[:, :, group + 1]
    return rotated_by_ops(query, cos, sin), rotated_by_ops(key, cos, sin), value


def _by_head(packed: torch.Tensor, group: int, size: int) -> torch.Tensor:
    """The packed projection (or its gradient) as (batch, key-value heads, group + 2,
    positions, size): a view."""
    return packed.unflatten(-1, (-1, group + 2, size)).permute(0, 2, 3, 1, 4)


class SplitRotated(torch.autograd.Function):
    """``split_rotated`` in the rotary kernel: query, key and value laid out as
    (batch, positions, heads, size) in memory, the layout SDPA's kernels read and write;
    the backward pass writes every element of the projection's gradient once."""

    @staticmethod
    def forward(ctx, qkv, cos, sin, group, size):
        ctx.save_for_backward(cos, sin)
        ctx.group, ctx.size = group, size
        packed = _by_head(last_dim_dense(qkv), group, size)
        batch, kv_heads, _, positions, _ = packed.shape
        query = qkv.new_empty(batch, positions, kv_heads, group, size)
        key = qkv.new_empty(batch, positions, kv_heads, 1, size)
        value = qkv.new_empty(batch, positions, kv_heads, size)
        for part, out in ((slice(0, group), query), (slice(group, group + 1), key)):
            rotate_into(packed[:, :, part], cos, sin, out.permute(0, 2, 3, 1, 4), backward=False)
        value.copy_(packed[:, :, group + 1].transpose(1, 2))
        return query.flatten(2, 3).transpose(1, 2), key.squeeze(3).transpose(1, 2), value.transpose(1, 2)

    @staticmethod
    def backward(ctx, grad_query, grad_key, grad_value):
        cos, sin = ctx.saved_tensors
        group, size = ctx.group, ctx.size
        batch, heads, positions, _ = grad_query.shape
        grad = grad_query.new_empty(batch, positions, (heads // group) * (group + 2) * size)
        packed = _by_head(grad, group, size)
        grads = (last_dim_dense(grad_query).unflatten(1, (-1, group)), last_dim_dense(grad_key).unsqueeze(2))
        for part, incoming in zip((slice(0, group), slice(group, group + 1)), grads):
            rotate_into(incoming, cos, sin, packed[:, :, part], backward=True)
        packed[:, :, group + 1].copy_(grad_value)
        return grad, None, None, None, None


def _computes_the_same(attention: torch.nn.Module) -> bool:
    """Whether ``attention``'s class computes what ``grouped_attention`` does: a small
    float32 CPU instance of it (4 query heads in 2 groups, head size 16, its config's
    rotary scaling), with random weights, on a padded causal batch, its own forward
    against ``grouped_attention``, to float32 rounding."""
    config = copy.deepcopy(attention.config)
    config.hidden_size, config.num_attention_heads, config.num_key_value_heads = 64, 4, 2
    generator = torch.Generator().manual_seed(0)
    batch, positions = 2, 6
    hidden = torch.randn(batch, positions, 64, generator=generator)
    keep = torch.tensor([[True] * positions, [True] * 4 + [False] * 2])  # the second sample padded
    allowed = torch.ones(positions, positions, dtype=torch.bool).tril() & keep[:, None, None, :]
    mask = torch.zeros(batch, 1, positions, positions).masked_fill(~allowed, torch.finfo(torch.float32).min)
    arguments = dict(attention_mask=mask, position_ids=torch.arange(positions).expand(batch, positions))
    try:
        small = type(attention)(config, layer_idx=0).float()
        for parameter in small.parameters():
            parameter.data = torch.randn(parameter.shape, generator=generator) * 0.2
        with torch.no_grad():
            own = type(small).forward(small, hidden, **arguments)[0]
            ours = grouped_attention(small, hidden, **arguments)[0]
        return torch.allclose(ours, own, rtol=1e-5, atol=1e-6)
    except Exception:  # noqa: BLE001 - another signature or other parts: not this function
        return False
