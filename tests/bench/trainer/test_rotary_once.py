"""The rotary-once lever (bench/trainer/rotary_once.py) on InternLM2's own code: which
modules it shares, and that a shared module's answers are the model code's, through
the dynamic-NTK rescaling and through changes it must not answer from before."""

from __future__ import annotations

import pytest

from bench.core.layout import Layout


@pytest.fixture
def internlm2(synthetic_layout):
    """A function building the tiny layout's LLM (InternLM2's code, dynamic-NTK rotary
    scaling), in float32 on CPU."""
    from transformers import AutoModelForCausalLM

    return lambda: AutoModelForCausalLM.from_pretrained(Layout.at(synthetic_layout).llm_dir, trust_remote_code=True)


def _rotaries(llm) -> list:
    return [layer.attention.rotary_emb for layer in llm.model.layers]


def test_the_layers_share_one_rotary_module_that_follows_the_dynamic_rescaling(internlm2):
    """Forwards at positions within the model's length, then past it (the dynamic-NTK
    module rescales its frequencies, for good), then within it again: the shared module's
    logits are the model code's bit for bit, and its frequencies are each layer's own."""
    import torch

    from bench.trainer.rotary_once import share_rotary

    own, shared = internlm2(), internlm2()
    share_rotary(shared)
    rotaries = _rotaries(shared)
    assert len(rotaries) > 1 and all(rotary is rotaries[0] for rotary in rotaries)
    assert type(rotaries[0]).__name__ == "InternLM2DynamicNTKScalingRotaryEmbedding"
    longest = own.config.max_position_embeddings
    input_ids = torch.tensor([[1, 5, 6, 7]])
    frequencies = rotaries[0].inv_freq
    for positions in ([0, 1, 2, 3], [0, 1, 2, longest + 7], [0, 1, 2, 3]):
        position_ids = torch.tensor([positions])
        with torch.no_grad():
            expected = own(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
            logits = shared(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
        assert torch.equal(logits, expected), positions
        assert all(torch.equal(rotaries[0].inv_freq, rotary.inv_freq) for rotary in _rotaries(own))
    assert not torch.equal(rotaries[0].inv_freq, frequencies)  # the long positions did rescale


def test_a_kept_answer_is_given_only_to_the_same_call(internlm2):
    """The same positions tensor and dtype: the kept cos and sin themselves. Another
    dtype, positions or cos changed in place, the module's frequencies replaced, another
    positions tensor: the module's own forward, computed anew."""
    import torch

    from bench.trainer.rotary_once import share_rotary

    llm = internlm2()
    share_rotary(llm)
    rotary = _rotaries(llm)[0]
    x = torch.zeros(1, 2, 4, 8)
    positions = torch.arange(4)[None]
    cos, sin = rotary(x, positions)
    assert all(a is b for a, b in zip(rotary(x, positions), (cos, sin)))
    own = type(rotary).forward

    def fresh(*call):
        answer = rotary(*call)
        return not any(a is b for a, b in zip(answer, (cos, sin))) and all(
            torch.equal(a, b) for a, b in zip(answer, own(rotary, *call))
        )

    assert fresh(x.half(), positions)
    cos, sin = rotary(x, positions)
    positions.add_(1)
    assert fresh(x, positions)
    cos, sin = rotary(x, positions)
    cos.mul_(2)
    assert fresh(x, positions)
    cos, sin = rotary(x, positions)
    rotary.register_buffer("inv_freq", rotary.inv_freq * 2, persistent=False)  # as the dynamic module rescales
    assert fresh(x, positions)
    cos, sin = rotary(x, positions)
    assert fresh(x, positions.clone())


def test_unlike_rotary_modules_are_not_shared(internlm2):
    """A layer whose rotary module has another base keeps its own, as do modules whose
    buffers cannot be compared; the alike ones share."""
    from bench.trainer.rotary_once import share_rotary

    llm = internlm2()
    layers = llm.model.layers
    assert len(layers) == 2
    own = layers[1].attention.rotary_emb
    other = type(own)(own.dim, own.max_position_embeddings, base=own.base * 2, scaling_factor=own.scaling_factor)
    layers[1].attention.rotary_emb = other
    share_rotary(llm)
    assert layers[1].attention.rotary_emb is other and layers[0].attention.rotary_emb is not other
    assert "forward" in vars(other) and "forward" in vars(layers[0].attention.rotary_emb)
    # buffers whose values cannot be compared (on the meta device): not shared, nothing raised
    llm = internlm2()
    for layer in llm.model.layers:
        layer.attention.rotary_emb.to("meta")
    share_rotary(llm)
    rotaries = _rotaries(llm)
    assert rotaries[0] is not rotaries[1]
