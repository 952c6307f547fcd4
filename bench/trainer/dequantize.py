"""The NF4-dequantized LLM, loaded inside XTuner's trainer (the dequantize-NF4 lever,
bench/recipe/levers.py)."""

from __future__ import annotations


def from_pretrained_dequantized(**kwargs):
    """``AutoModelForCausalLM.from_pretrained`` with the NF4 config, then every 4-bit
    linear replaced by a frozen linear holding the weight bitsandbytes would dequantize
    at every forward and backward: the same values, computed once.

    Named in the rendered config (the trainer processes import it), so it runs where
    XTuner builds the model.
    """
    import bitsandbytes as bnb
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(**kwargs)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, bnb.nn.Linear4bit):
                continue
            weight = bnb.functional.dequantize_4bit(child.weight.data, child.weight.quant_state)
            linear = torch.nn.Linear(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                device=weight.device,
                dtype=weight.dtype,
            )
            linear.weight = torch.nn.Parameter(weight, requires_grad=False)
            if child.bias is not None:
                linear.bias = torch.nn.Parameter(child.bias.data.to(weight.dtype), requires_grad=False)
            setattr(parent, name, linear)
    torch.cuda.empty_cache()
    return model
