"""The NF4-dequantized LLM, loaded inside XTuner's trainer (the dequantize-NF4 lever,
bench/recipe/levers.py)."""

from __future__ import annotations

import contextlib
import functools


def from_pretrained_dequantized(quantization_config, **kwargs):
    """What ``AutoModelForCausalLM.from_pretrained(**kwargs, quantization_config=...)``
    (NF4) holds, each 4-bit linear then made a frozen linear of the weight bitsandbytes
    would dequantize at every forward and backward: the same values, computed once.

    Built on the GPU: the checkpoint's tensors are read straight onto it and converted
    to ``torch_dtype`` there, and each weight that transformers would quantize (the
    linears its own ``replace_with_bnb_linear`` converts, with the parameters it gives
    them) is quantized and dequantized there by bitsandbytes, where transformers
    converts every weight on the CPU and copies it to the GPU for quantization. The
    conversions round alike on either device; tests/gpu/test_gpu.py holds every
    parameter and buffer equal to transformers' own NF4 loading, dequantized.

    Named in the rendered config (the trainer processes import it), so it runs where
    XTuner builds the model, after its launcher has chosen the rank's GPU.
    """
    import bitsandbytes as bnb
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    from transformers.integrations import get_keys_to_not_convert, replace_with_bnb_linear

    device = torch.device("cuda", torch.cuda.current_device())
    with _shards_read_onto(device):
        model = AutoModelForCausalLM.from_pretrained(**kwargs, device_map={"": device})
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(model.config, trust_remote_code=kwargs.get("trust_remote_code"))
    # transformers' own choice of what stays unquantized: the skipped modules, else the output head
    kept = quantization_config.llm_int8_skip_modules or get_keys_to_not_convert(skeleton)
    kept = [*([kept] if isinstance(kept, str) else kept), *(getattr(skeleton, "_keep_in_fp32_modules", None) or [])]
    skeleton = replace_with_bnb_linear(skeleton, modules_to_not_convert=kept, quantization_config=quantization_config)
    for name, four_bit in skeleton.named_modules():
        if not isinstance(four_bit, bnb.nn.Linear4bit):
            continue
        linear = model.get_submodule(name)
        if type(linear) is not torch.nn.Linear:  # transformers transposes a Conv1D's weight first: not done here
            raise TypeError(f"dequantize_nf4: {name} is a {type(linear).__name__}, not a torch.nn.Linear")
        # as transformers quantizes a loaded weight: a Params4bit with the 4-bit layer's settings, moved to the GPU
        quantized = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, **four_bit.weight.__dict__).to(device)
        weight = bnb.functional.dequantize_4bit(quantized.data, quantized.quant_state)
        linear.weight = torch.nn.Parameter(weight, requires_grad=False)
    torch.cuda.empty_cache()
    return model


@contextlib.contextmanager
def _shards_read_onto(device):
    """transformers' reading of each safetensors shard (``safe_load_file`` in
    ``transformers.modeling_utils``, 4.37 to 4.48) onto ``device``, so that its dtype
    conversion runs there; where that name is absent, reading as transformers does."""
    import transformers.modeling_utils as loading

    original = getattr(loading, "safe_load_file", None)
    if original is None:
        yield
        return
    loading.safe_load_file = functools.partial(original, device=f"{device.type}:{device.index}")
    try:
        yield
    finally:
        loading.safe_load_file = original
