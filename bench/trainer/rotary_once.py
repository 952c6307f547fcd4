"""The rotary-once lever: the LLM's rotary cos and sin computed once a forward for all
its layers, not in every layer's attention and again in every recompute.

InternLM2's attention calls its own rotary module in each layer: about ten small
kernels from the positions, and the dynamic-NTK module reads ``max(position_ids)`` back
to the CPU to decide on rescaling, a stream synchronization that drains the GPU's
queue: 94 a step on the 20B default, and in a recomputed layer those small ops go
through the selective checkpoint's Python dispatch while the GPU waits
(docs/PERFORMANCE.md). The model gives every layer the same position_ids tensor, and
the modules are alike: built from one config with equal buffers, and the dynamic one
changes its inverse frequencies only as a function of the positions it is given, so
every layer's module holds the same state at each call. Here the layers share one of
them, which answers a call with the results of its last one where nothing they were
computed from has changed since: the same positions tensor, unmodified, the same dtype
and device asked for, its own buffers the same tensors, unmodified. Anything else
calls the module's own forward, so the numbers are the model code's in every case.
"""

from __future__ import annotations

import torch


def share_rotary(llm: torch.nn.Module) -> None:
    """Give each attention of ``llm`` the first rotary module alike to its own, that
    module answering repeated calls from ``LastCallKept``."""
    shared: list[torch.nn.Module] = []
    attentions = [module for module in llm.modules() if _is_rotary(getattr(module, "rotary_emb", None))]
    for attention in attentions:
        own = attention.rotary_emb
        alike = next((module for module in shared if _alike(module, own)), None)
        if alike is None:
            own.forward = LastCallKept(own)
            shared.append(own)
        else:
            attention.rotary_emb = alike


class LastCallKept:
    """A rotary module's forward that keeps its last call's cos and sin and answers
    the same call again with them, as long as nothing they came from has changed."""

    def __init__(self, rotary: torch.nn.Module):
        self.rotary = rotary
        self.own_forward = rotary.forward
        self.last: tuple | None = None  # (position_ids, the call's state, its results)

    def __call__(self, x, position_ids=None, *args, **kwargs):
        if args or kwargs or not isinstance(position_ids, torch.Tensor) or position_ids.is_inference():
            return self.own_forward(x, position_ids, *args, **kwargs)
        if self.last is not None:
            positions, state, results = self.last
            if positions is position_ids and _same_state(state, self._state(x, position_ids, results)):
                return results
        results = self.own_forward(x, position_ids)
        # taken after the call: the dynamic module may have replaced its frequencies for these positions
        self.last = (position_ids, self._state(x, position_ids, results), results)
        return results

    def _state(self, x: torch.Tensor, position_ids: torch.Tensor, results) -> tuple:
        """What the results depend on, and whether they are still as returned: tensors
        compared by identity, then plain values and versions (in-place changes)."""
        buffers = tuple(self.rotary.buffers())
        tensors = (*buffers, *results)
        plain = (
            x.dtype,
            x.device,
            torch.is_inference_mode_enabled(),  # its results would be inference tensors, unfit for autograd
            position_ids._version,
            *(tensor._version for tensor in tensors),
        )
        return tensors, plain


def _same_state(kept: tuple, now: tuple) -> bool:
    (kept_tensors, kept_plain), (now_tensors, now_plain) = kept, now
    return (
        len(kept_tensors) == len(now_tensors)
        and all(a is b for a, b in zip(kept_tensors, now_tensors))
        and kept_plain == now_plain
    )


def _is_rotary(module) -> bool:
    """A model code's rotary module: named so, buffers (its frequencies), no weights."""
    return (
        isinstance(module, torch.nn.Module)
        and type(module).__name__.endswith("RotaryEmbedding")
        and any(True for _ in module.buffers())
        and not any(True for _ in module.parameters())
        and not any(True for _ in module.children())
    )


def _alike(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """The same class, the same plain settings and equal buffers: the same results
    for the same calls."""

    def settings(module):
        return {
            name: value
            for name, value in vars(module).items()
            if not name.startswith("_") and isinstance(value, (bool, int, float, str, type(None)))
        }

    buffers_a, buffers_b = dict(a.named_buffers()), dict(b.named_buffers())
    try:
        return (
            type(a) is type(b)
            and settings(a) == settings(b)
            and buffers_a.keys() == buffers_b.keys()
            and all(
                buffers_a[name].dtype == buffers_b[name].dtype
                and buffers_a[name].device == buffers_b[name].device
                and torch.equal(buffers_a[name], buffers_b[name])
                for name in buffers_a
            )
        )
    except (RuntimeError, NotImplementedError):  # buffers without values to compare (meta): each keeps its own
        return False
